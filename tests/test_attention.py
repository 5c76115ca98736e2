"""jaxft.attention gives Hugging Face's values and gradients, dropout masks included, by its
JAX path and by the CPU layer's fused kernel (jaxft/cpu/attention_cpu.cc)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxft import attention
from jaxft.cpu import attention as cpu_attention, native
from jaxft.errors import UserError

PATHS = ("jaxft", "kernel")  # the paths with dropout; "fused" has its own tests


def _tiny(family: str, dtype=jnp.float32, attention_dropout: float = 0.2):
  """A random 2-layer sequence classifier of a BERT-family architecture, with dropout on; 4
  heads of depth 16 (the kernel takes depths that are multiples of 16)."""
  import transformers
  config_class = getattr(transformers, f"{family}Config")
  config = config_class(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=attention_dropout, num_labels=3,
                        **({"embedding_size": 64} if family == "Electra" else {}))
  model_class = getattr(transformers, f"Flax{family}ForSequenceClassification")
  return model_class(config, seed=0, dtype=dtype)


def _batch(batch=3, length=11):
  rng = np.random.default_rng(0)
  mask = np.ones((batch, length), np.int32)
  mask[1, 7:] = 0  # padding: the bias must hide these keys
  mask[2, 3:] = 0
  return jnp.asarray(rng.integers(5, 120, (batch, length))), jnp.asarray(mask)


def _loss_and_grads(model, ids, mask, path: str, train: bool = True):
  """Loss and gradients with self-attention by `path`: "hf", "fused", "jaxft" or "kernel"."""
  def loss(params):
    def logits():
      return model(ids, mask, params=params, dropout_rng=jax.random.PRNGKey(7), train=train).logits
    if path == "hf":
      out = logits()
    else:
      with nn.intercept_methods(attention.interceptor_for(path)):
        out = logits()
    return jnp.sum(jnp.sin(out.astype(jnp.float32)) * jnp.arange(1.0, 4.0))
  return jax.jit(jax.value_and_grad(loss))(model.params)


def _counted(monkeypatch, module, name: str) -> list:
  """The shapes of q in every call of `module.name` (made while tracing)."""
  calls = []
  original = getattr(module, name)

  def counted(*args):
    calls.append(args[0].shape)
    return original(*args)

  monkeypatch.setattr(module, name, counted)
  return calls


@pytest.fixture
def fast_path_calls(monkeypatch):
  """How many times the interceptor took jaxft's JAX attention (while tracing)."""
  return _counted(monkeypatch, attention, "attention")


@pytest.fixture
def kernel_calls(monkeypatch):
  """How many times the interceptor took the fused kernel (while tracing)."""
  return _counted(monkeypatch, cpu_attention, "_kernel_attention")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family,train", [("Bert", True), ("Bert", False), ("Roberta", True),
                                          ("Electra", True)])
def test_same_loss_and_gradients_as_hugging_face(family, train, path, fast_path_calls,
                                                  kernel_calls):
  model = _tiny(family)
  ids, mask = _batch()
  loss_hf, grads_hf = _loss_and_grads(model, ids, mask, "hf", train=train)
  assert fast_path_calls == [] and kernel_calls == []
  loss, grads = _loss_and_grads(model, ids, mask, path, train=train)
  taken = kernel_calls if path == "kernel" else fast_path_calls
  assert len(taken) == 2  # both layers, shapes [batch, length, heads, depth]
  assert taken[0] == (3, 11, 4, 16)
  assert (fast_path_calls if path == "kernel" else kernel_calls) == []
  np.testing.assert_allclose(loss, loss_hf, rtol=1e-6)
  flat_hf, flat = jax.tree_util.tree_leaves(grads_hf), jax.tree_util.tree_leaves(grads)
  worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_hf, flat))
  largest = max(float(jnp.max(jnp.abs(a))) for a in flat_hf)
  assert largest > 0.1 and worst < 1e-5 * largest, (worst, largest)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_masks_follow_the_rng(path):
  """Same key: the masks Hugging Face draws; another key: a different loss (dropout is on)."""
  model = _tiny("Bert")
  ids, mask = _batch()

  def loss(key):
    with nn.intercept_methods(attention.interceptor_for(path)):
      return float(jnp.sum(model(ids, mask, dropout_rng=key, train=True).logits))

  assert loss(jax.random.PRNGKey(1)) == loss(jax.random.PRNGKey(1))
  assert loss(jax.random.PRNGKey(1)) != loss(jax.random.PRNGKey(2))


def test_bfloat16_close_to_hugging_face(kernel_calls):
  """bfloat16 takes the JAX path, also where the kernel is chosen (it is float32 only)."""
  model = _tiny("Bert", dtype=jnp.bfloat16)
  ids, mask = _batch()
  loss_hf, grads_hf = _loss_and_grads(model, ids, mask, "hf")
  loss, grads = _loss_and_grads(model, ids, mask, "kernel")
  assert kernel_calls == []
  np.testing.assert_allclose(loss, loss_hf, rtol=2e-2)
  for a, b in zip(jax.tree_util.tree_leaves(grads_hf), jax.tree_util.tree_leaves(grads)):
    assert b.dtype == a.dtype
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                               atol=3e-2 * float(jnp.max(jnp.abs(a))) + 1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_what_it_does_not_cover_falls_through(path, fast_path_calls, kernel_calls):
  """Returned attention weights (and DistilBERT's own attention) take Hugging Face's code."""
  model = _tiny("Bert")
  ids, mask = _batch()
  with nn.intercept_methods(attention.interceptor_for(path)):
    out = model(ids, mask, output_attentions=True)
  assert fast_path_calls == [] and kernel_calls == []
  assert out.attentions[0].shape == (3, 4, 11, 11)
  np.testing.assert_allclose(out.logits, model(ids, mask).logits, rtol=1e-6)

  import transformers
  distil = transformers.FlaxDistilBertForSequenceClassification(
      transformers.DistilBertConfig(vocab_size=120, dim=64, n_layers=1, n_heads=4, hidden_dim=48,
                                    max_position_embeddings=64), seed=0)
  with nn.intercept_methods(attention.interceptor_for(path)):
    logits = distil(ids, mask).logits
  assert fast_path_calls == [] and kernel_calls == []
  np.testing.assert_allclose(logits, distil(ids, mask).logits, rtol=1e-6)


def _operands(batch, length, heads, depth, bias: str, multiplier: str, seed=0):
  """q, k, v [batch, length, heads, depth], a padding bias and a dropout-like multiplier in the
  layouts Hugging Face's modules give: bias [batch, 1, 1, length], multiplier [1, 1 or heads,
  length or 1, length or 1]; "none" for either gives None."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, depth), np.float32))
             for _ in range(3))
  b = None
  if bias != "none":
    keep = np.ones((batch, length), bool)
    keep[0, length // 2 + 1:] = False  # padding
    if bias == "a row fully masked" and batch > 1:
      keep[1, :] = False  # Hugging Face then spreads the row evenly
    b = jnp.where(jnp.asarray(keep)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
  m = None
  if multiplier == "shared":
    m = jnp.asarray((rng.random((1, 1, length, length)) > 0.2) / 0.8, jnp.float32)
  elif multiplier == "per head":
    m = jnp.asarray((rng.random((1, heads, length, length)) > 0.2) / 0.8, jnp.float32)
  elif multiplier == "head mask":
    m = jnp.asarray(rng.random((1, heads, 1, 1)) > 0.3, jnp.float32)
  return q, k, v, b, m


@pytest.mark.parametrize("batch,length,heads,depth,bias,multiplier", [
    (3, 11, 4, 16, "padding", "shared"),
    (2, 1, 2, 32, "padding", "none"),
    (2, 17, 3, 64, "a row fully masked", "per head"),
    (1, 40, 2, 16, "none", "head mask"),
    (4, 128, 12, 32, "padding", "shared"),
])
def test_kernel_matches_the_jax_path(batch, length, heads, depth, bias, multiplier):
  """Values and all three gradients, for lengths that are and are not multiples of 16."""
  q, k, v, b, m = _operands(batch, length, heads, depth, bias, multiplier)
  g = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape, np.float32))
  operands = cpu_attention._operands(q, b, m)
  assert operands is not None
  out_jax, vjp_jax = jax.vjp(lambda q, k, v: attention.attention(q, k, v, b, m), q, k, v)
  out, vjp = jax.vjp(lambda q, k, v: cpu_attention._kernel_attention(q, k, v, *operands), q, k, v)
  np.testing.assert_allclose(out, out_jax, atol=2e-6, rtol=2e-5)
  for ours, theirs in zip(jax.jit(vjp)(g), vjp_jax(g)):
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * float(jnp.max(jnp.abs(theirs))),
                               rtol=1e-4)


def test_kernel_takes_an_empty_batch():
  q = jnp.zeros((0, 5, 2, 16))
  operands = cpu_attention._operands(q, None, None)
  out, vjp = jax.vjp(lambda q, k, v: cpu_attention._kernel_attention(q, k, v, *operands), q, q, q)
  assert out.shape == q.shape and all(g.shape == q.shape for g in vjp(out))


def test_kernel_operands_where_it_does_not_apply():
  q, k, v, b, m = _operands(2, 8, 2, 16, "padding", "shared")
  assert cpu_attention._operands(q.astype(jnp.bfloat16), b, m) is None
  q8 = q[..., :8]  # depth 8: not a multiple of 16
  assert cpu_attention._operands(q8, b, m) is None
  per_query_bias = jnp.zeros((2, 1, 8, 8))  # not a padding bias
  assert cpu_attention._operands(q, per_query_bias, m) is None
  per_example = jnp.ones((2, 1, 8, 8))  # a multiplier that differs per example
  assert cpu_attention._operands(q, b, per_example) is None


def test_kernel_under_a_symbolic_length():
  """jaxft traces its steps once with a symbolic width (jax.export): the kernel takes it."""
  from jax import export
  (width,) = export.symbolic_shape("width")
  spec = jax.ShapeDtypeStruct((2, width, 2, 16), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(cpu_attention._kernel_attention(q, k, v, *cpu_attention._operands(q, None,
                                                                                   None)) ** 2)

  checks = [export.DisabledSafetyCheck.custom_call(t) for t in attention.custom_call_targets()]
  assert checks, "the kernel's targets are registered once it has been used"
  exported = export.export(jax.jit(jax.value_and_grad(loss)), disabled_checks=checks)(
      spec, spec, spec)
  for length in (3, 20):
    q, k, v, _, _ = _operands(2, length, 2, 16, "none", "none", seed=length)
    value, grad = jax.jit(exported.call)(q, k, v)
    value_ref, grad_ref = jax.value_and_grad(loss)(q, k, v)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["Bert", "Roberta", "Electra"])
def test_fused_path_gives_hugging_faces_values_and_gradients(family):
  """jax.nn.dot_product_attention (its XLA implementation here, on the CPU), attention dropout
  off as on the fused path, hidden dropout on; padded rows included."""
  model = _tiny(family, attention_dropout=0.0)
  ids, mask = _batch()
  attention.fused_implementations.clear()
  for train in (True, False):
    loss_hf, grads_hf = _loss_and_grads(model, ids, mask, "hf", train=train)
    loss, grads = _loss_and_grads(model, ids, mask, "fused", train=train)
    np.testing.assert_allclose(loss, loss_hf, rtol=1e-6)
    flat_hf, flat = jax.tree_util.tree_leaves(grads_hf), jax.tree_util.tree_leaves(grads)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_hf, flat))
    largest = max(float(jnp.max(jnp.abs(a))) for a in flat_hf)
    assert largest > 0.1 and worst < 1e-5 * largest, (worst, largest)
  assert attention.fused_implementations == {"xla"}  # cuDNN is for GPUs only


def test_fused_path_drops_attention_through_the_jax_path(fast_path_calls):
  """Fused kernels have no dropout on probabilities: a training call that must drop takes the
  JAX path (Hugging Face's masks), an evaluation call stays fused."""
  model = _tiny("Bert", attention_dropout=0.2)
  ids, mask = _batch()
  loss_hf, _ = _loss_and_grads(model, ids, mask, "hf", train=True)
  loss, _ = _loss_and_grads(model, ids, mask, "fused", train=True)
  assert len(fast_path_calls) == 2
  np.testing.assert_allclose(loss, loss_hf, rtol=1e-6)
  _loss_and_grads(model, ids, mask, "fused", train=False)
  assert len(fast_path_calls) == 2


def test_implementation_by_platform_and_build(monkeypatch, capsys):
  cpu_attention.targets()  # buildable here (CI and this machine have a C++ compiler)
  assert attention.implementation("auto", "cpu") == "kernel"
  assert attention.implementation("auto", "gpu") == "fused"
  assert attention.implementation("auto", "tpu") == "fused"
  assert attention.implementation("fused", "cpu") == "fused"
  assert attention.implementation("jaxft", "gpu") == "jaxft"
  assert attention.implementation("hf", "cpu") == "hf"
  # a multi-device jit program would gather the kernel's operands: the JAX path there
  assert attention.implementation("auto", "cpu", whole_arrays=False) == "jaxft"
  with pytest.raises(UserError, match="model.attention=kernel runs on the CPU"):
    attention.implementation("kernel", "gpu")
  # no compiler: auto keeps the JAX path with one warning; an explicit kernel is an error
  monkeypatch.setattr(cpu_attention, "targets", functools.partial(
      _raise, native.BuildError("no C++ compiler found")))
  assert attention.implementation("auto", "cpu") == "jaxft"
  assert "no C++ compiler found" in capsys.readouterr().err
  with pytest.raises(UserError, match="cannot be built here: no C\\+\\+ compiler found"):
    attention.implementation("kernel", "cpu")
  # the CPU layer switched off: auto takes the JAX path silently, an explicit kernel is an error
  monkeypatch.setenv("JAXFT_CPU_TUNING", "0")
  assert attention.implementation("auto", "cpu") == "jaxft"
  with pytest.raises(UserError, match="switched off"):
    attention.implementation("kernel", "cpu")


def _raise(error):
  raise error
