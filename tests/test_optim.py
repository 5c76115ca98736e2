"""Weight-decay mask rules, the learning-rate schedule and the fused AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import optim


def test_weight_decay_mask_skips_biases_and_layernorm():
  params = {"bert": {"encoder": {"layer": {"0": {
      "attention": {"self": {"query": {"kernel": 0, "bias": 0}}},
      "output": {"LayerNorm": {"scale": 0, "bias": 0}, "dense": {"kernel": 0}}}}},
      "embeddings": {"word_embeddings": {"embedding": 0}}},
      "classifier": {"kernel": 0, "bias": 0}}
  mask = optim.weight_decay_mask(params)
  layer = mask["bert"]["encoder"]["layer"]["0"]
  assert layer["attention"]["self"]["query"] == {"kernel": True, "bias": False}
  assert layer["output"]["LayerNorm"] == {"scale": False, "bias": False}
  assert layer["output"]["dense"]["kernel"] is True
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"] is True
  assert mask["classifier"] == {"kernel": True, "bias": False}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_warms_up_then_decays_to_zero(kind):
  s = optim.learning_rate_schedule(1e-3, total_steps=100, warmup_ratio=0.1, kind=kind)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(55)) == pytest.approx(5e-4, rel=1e-5)  # half way through the decay
  assert float(s(100)) == pytest.approx(0.0, abs=1e-12)
  values = [float(s(i)) for i in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_without_warmup():
  s = optim.learning_rate_schedule(2e-5, 50, 0.0, "constant")
  assert [float(s(i)) for i in (0, 10, 49)] == pytest.approx([2e-5] * 3)


def _optax_adamw(values: dict, decay: dict, multipliers: dict, b1, b2, eps, schedule):
  """What `optim.adamw` fuses, as optax's own transformations chained."""
  scale = lambda factors: optax.GradientTransformation(
      lambda p: optim._Empty(),
      lambda u, s, p=None: (jax.tree_util.tree_map(lambda u, f: u * f, u, factors), s))
  decay_tx = optax.GradientTransformation(
      lambda p: optim._Empty(),
      lambda u, s, p=None: (jax.tree_util.tree_map(
          lambda u, p, f: u + values["weight_decay"] * f * p, u, p, decay), s))
  return optax.chain(optax.clip_by_global_norm(values["max_grad_norm"]),
                     optax.scale_by_adam(b1=b1, b2=b2, eps=eps), decay_tx,
                     optax.scale_by_learning_rate(lambda count: schedule(count, values)),
                     scale(multipliers))


@pytest.mark.parametrize("max_grad_norm", [0.05, float("inf")])  # clipping on / off
def test_fused_adamw_equals_optax_chain(max_grad_norm):
  """Ten steps of `adamw` (decay and learning rate per parameter, clipping on and off) give
  optax's chained updates and moments, and its state has the chain's layout (checkpoints)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  decay, multipliers = {"w": 1.0, "b": 0.0}, {"w": 1.0, "b": 0.5}
  values = {**optim.run_values(_TrainConfig(), 10), "max_grad_norm": max_grad_norm}
  values = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
  schedule = lambda count, values: optim.learning_rate_at(count, values, "linear")
  fused = optim.adamw(decay, multipliers, values, 0.9, 0.999, 1e-6, schedule)
  chain = _optax_adamw(values, decay, multipliers, 0.9, 0.999, 1e-6, schedule)
  ours, theirs = fused.init(params), chain.init(params)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
  p_ours, p_theirs = params, params
  clipped = 0
  for step in range(10):
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) * 0.1, params)
    norm = optax.tree.norm(grads)
    clipped += norm > max_grad_norm
    u_ours, ours = fused.update(grads, ours, p_ours, grad_norm=norm if step % 2 else None)
    u_theirs, theirs = chain.update(grads, theirs, p_theirs)
    p_ours = jax.tree_util.tree_map(jnp.add, p_ours, u_ours)
    p_theirs = jax.tree_util.tree_map(jnp.add, p_theirs, u_theirs)
    for a, b in zip(jax.tree_util.tree_leaves((u_ours, ours)),
                    jax.tree_util.tree_leaves((u_theirs, theirs))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-9)
  assert clipped == (10 if max_grad_norm < 1 else 0)  # both cases ran as meant
  assert float(jnp.abs(p_ours["w"] - params["w"]).max()) > 1e-6  # it moved


class _TrainConfig:
  learning_rate, warmup_ratio, weight_decay, max_grad_norm = 1e-2, 0.2, 0.1, 1.0
