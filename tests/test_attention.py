"""jaxft.attention gives Hugging Face's values and gradients, dropout masks included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxft import attention


def _tiny(family: str, dtype=jnp.float32):
  """A random 2-layer sequence classifier of a BERT-family architecture, with dropout on."""
  import transformers
  config_class = getattr(transformers, f"{family}Config")
  config = config_class(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.2, num_labels=3,
                        **({"embedding_size": 32} if family == "Electra" else {}))
  model_class = getattr(transformers, f"Flax{family}ForSequenceClassification")
  return model_class(config, seed=0, dtype=dtype)


def _batch(batch=3, length=11):
  rng = np.random.default_rng(0)
  mask = np.ones((batch, length), np.int32)
  mask[1, 7:] = 0  # padding: the bias must hide these keys
  mask[2, 3:] = 0
  return jnp.asarray(rng.integers(5, 120, (batch, length))), jnp.asarray(mask)


def _loss_and_grads(model, ids, mask, jaxft_path: bool, train: bool = True):
  def loss(params):
    def logits():
      return model(ids, mask, params=params, dropout_rng=jax.random.PRNGKey(7), train=train).logits
    if jaxft_path:
      with nn.intercept_methods(attention.interceptor):
        out = logits()
    else:
      out = logits()
    return jnp.sum(jnp.sin(out.astype(jnp.float32)) * jnp.arange(1.0, 4.0))
  return jax.jit(jax.value_and_grad(loss))(model.params)


@pytest.fixture
def fast_path_calls(monkeypatch):
  """How many times the interceptor took jaxft's attention (while tracing)."""
  calls = []
  original = attention.attention

  def counted(*args):
    calls.append(args[0].shape)
    return original(*args)

  monkeypatch.setattr(attention, "attention", counted)
  return calls


@pytest.mark.parametrize("family,train", [("Bert", True), ("Bert", False), ("Roberta", True),
                                          ("Electra", True)])
def test_same_loss_and_gradients_as_hugging_face(family, train, fast_path_calls):
  model = _tiny(family)
  ids, mask = _batch()
  loss_hf, grads_hf = _loss_and_grads(model, ids, mask, jaxft_path=False, train=train)
  assert fast_path_calls == []
  loss, grads = _loss_and_grads(model, ids, mask, jaxft_path=True, train=train)
  assert len(fast_path_calls) == 2  # both layers, shapes [batch, length, heads, depth]
  assert fast_path_calls[0] == (3, 11, 4, 8)
  np.testing.assert_allclose(loss, loss_hf, rtol=1e-6)
  flat_hf, flat = jax.tree_util.tree_leaves(grads_hf), jax.tree_util.tree_leaves(grads)
  worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_hf, flat))
  largest = max(float(jnp.max(jnp.abs(a))) for a in flat_hf)
  assert largest > 0.1 and worst < 1e-5 * largest, (worst, largest)


def test_dropout_masks_follow_the_rng():
  """Same key: the masks Hugging Face draws; another key: a different loss (dropout is on)."""
  model = _tiny("Bert")
  ids, mask = _batch()

  def loss(key):
    with nn.intercept_methods(attention.interceptor):
      return float(jnp.sum(model(ids, mask, dropout_rng=key, train=True).logits))

  assert loss(jax.random.PRNGKey(1)) == loss(jax.random.PRNGKey(1))
  assert loss(jax.random.PRNGKey(1)) != loss(jax.random.PRNGKey(2))


def test_bfloat16_close_to_hugging_face():
  model = _tiny("Bert", dtype=jnp.bfloat16)
  ids, mask = _batch()
  loss_hf, grads_hf = _loss_and_grads(model, ids, mask, jaxft_path=False)
  loss, grads = _loss_and_grads(model, ids, mask, jaxft_path=True)
  np.testing.assert_allclose(loss, loss_hf, rtol=2e-2)
  for a, b in zip(jax.tree_util.tree_leaves(grads_hf), jax.tree_util.tree_leaves(grads)):
    assert b.dtype == a.dtype
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                               atol=3e-2 * float(jnp.max(jnp.abs(a))) + 1e-3)


def test_what_it_does_not_cover_falls_through(fast_path_calls):
  """Returned attention weights (and DistilBERT's own attention) take Hugging Face's code."""
  model = _tiny("Bert")
  ids, mask = _batch()
  with nn.intercept_methods(attention.interceptor):
    out = model(ids, mask, output_attentions=True)
  assert fast_path_calls == []
  assert out.attentions[0].shape == (3, 4, 11, 11)
  np.testing.assert_allclose(out.logits, model(ids, mask).logits, rtol=1e-6)

  import transformers
  distil = transformers.FlaxDistilBertForSequenceClassification(
      transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=1, n_heads=4, hidden_dim=48,
                                    max_position_embeddings=64), seed=0)
  with nn.intercept_methods(attention.interceptor):
    logits = distil(ids, mask).logits
  assert fast_path_calls == []
  np.testing.assert_allclose(logits, distil(ids, mask).logits, rtol=1e-6)


def test_auto_means_the_cpu():
  assert attention.uses_jaxft("auto", "cpu")
  assert not attention.uses_jaxft("auto", "gpu")
  assert not attention.uses_jaxft("auto", "tpu")
  assert attention.uses_jaxft("jaxft", "gpu")
  assert not attention.uses_jaxft("hf", "cpu")
