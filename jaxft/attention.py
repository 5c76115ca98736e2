"""BERT-family self-attention with a hand-written backward pass, for XLA's CPU backend.

Why: in a MiniLM train step at 32 x 128 tokens the attention core (scores, softmax, dropout,
mixing; 5% of the step's FLOPs) took 105-125 ms per layer forward and backward on this
project's 2-core machine, and its forward alone 60-95 ms. The cause is the form of the batched
dots that XLA derives from Hugging Face's einsums: dK = dS^T Q contracts the first axis of its
left operand, which YNNPACK refuses (it ran as an Eigen dot), and the forward's P V became
(V^T P^T)^T, a slow YNNPACK path (23 ms of a 117 ms layer); and the broadcast dropout mask was
materialised at full [batch, heads, q, k] size as an input of a YNN fusion (10 ms). Here every
dot is a plain batched [m, k] x [k, n] product: the small [batch, length, heads, depth] operands
are transposed instead of the large [batch, heads, q, k] ones, and the backward pass reuses the
dropped-out probabilities, so the mask is never needed at full size. Measured in turns in one
process: the core forward and backward 1.2-1.3x faster, its forward 2x; the whole forward
(evaluation, prediction) at 32 x 128 1.2-1.6x; the whole train step 0-2% (the README's Speed
section). tests/test_attention.py checks values and gradients against Hugging Face's.

The values are Hugging Face's FlaxBertSelfAttention's: the same projections (so LoRA's Dense
interceptor still applies), the same bias for padding, the same dropout masks, drawn from the
module's own `dropout` rng with flax's `dot_product_attention_weights` rules, and the head mask.
Anything this path does not cover (causal or cross attention, a cache, returned attention
weights) falls through to Hugging Face's code.

`model.attention` picks it: "auto" (this path on the CPU, Hugging Face's elsewhere: GPU and
TPU libraries take transposed operands natively, and it has not been measured there), "jaxft"
or "hf".
"""

from __future__ import annotations

import inspect
from typing import Optional

import jax
import jax.numpy as jnp

ATTENTIONS = ("auto", "jaxft", "hf")

# Hugging Face Flax self-attention modules that are copies of BERT's (same fields and call).
_BERT_SELF_ATTENTION = frozenset({
    "FlaxBertSelfAttention", "FlaxRobertaSelfAttention", "FlaxXLMRobertaSelfAttention",
    "FlaxElectraSelfAttention", "FlaxRobertaPreLayerNormSelfAttention"})


def uses_jaxft(choice: str, platform: Optional[str] = None) -> bool:
  """Whether `model.attention=choice` takes this module's path on `platform` (default: JAX's)."""
  if choice == "auto":
    return (platform or jax.default_backend()) == "cpu"
  return choice == "jaxft"


def _heads(x: jax.Array) -> jax.Array:
  """[batch, length, heads, depth] -> [batch, heads, length, depth], and back (self-inverse)."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _heads_depth_first(x: jax.Array) -> jax.Array:
  """[batch, length, heads, depth] -> [batch, heads, depth, length]."""
  return jnp.transpose(x, (0, 2, 3, 1))


def _from_depth_first(x: jax.Array) -> jax.Array:
  """[batch, heads, depth, length] -> [batch, length, heads, depth]."""
  return jnp.transpose(x, (0, 3, 1, 2))


def _sqrt_depth(q: jax.Array) -> jax.Array:
  """What flax divides the queries by, in their dtype."""
  return jnp.sqrt(q.shape[-1]).astype(q.dtype)


def _probabilities(q, k, bias):
  """softmax(q k^T / sqrt(depth) + bias) per head, [batch, heads, q, k], in q's dtype."""
  scores = jnp.matmul(_heads(q) / _sqrt_depth(q), _heads_depth_first(k))
  if bias is not None:
    scores = scores + bias
  return jax.nn.softmax(scores).astype(q.dtype)


def _forward(q, k, v, bias, multiplier):
  p = _probabilities(q, k, bias)
  dropped = p if multiplier is None else p * multiplier
  return _heads(jnp.matmul(dropped, _heads(v))), (q, k, v, p, dropped)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array],
              multiplier: Optional[jax.Array]) -> jax.Array:
  """Multi-head attention mixing, [batch, length, heads, depth] in and out.

  `bias` broadcasts to [batch, heads, q, k] (0 or a large negative for padding); `multiplier`
  is dropout's keep mask / keep probability, broadcasting likewise (None: no dropout). Neither
  is differentiated.
  """
  return _forward(q, k, v, bias, multiplier)[0]


def _attention_bwd(residuals, g):
  q, k, v, p, dropped = residuals
  d_dropped = jnp.matmul(_heads(g), _heads_depth_first(v))         # [b, h, q, k]
  dv = _from_depth_first(jnp.matmul(_heads_depth_first(g), dropped))  # (g^T P')^T
  # Softmax backward: dS = P * (dP - rowsum(dP * P)) with dP = dP' * multiplier. Since
  # P * dP = P' * dP' (P' = P * multiplier), the multiplier itself is not needed.
  t = dropped * d_dropped
  ds = t - p * jnp.sum(t, axis=-1, keepdims=True)
  dq = _heads(jnp.matmul(ds, _heads(k)) / _sqrt_depth(q))
  dk = _from_depth_first(jnp.matmul(_heads_depth_first(q) / _sqrt_depth(q), ds))  # (Q^T dS)^T
  return dq, dk, dv, None, None


attention.defvjp(_forward, _attention_bwd)


def _dropout_multiplier(module, length_q: int, length_k: int) -> jax.Array:
  """flax's broadcast attention dropout, drawn as `dot_product_attention_weights` draws it."""
  rate = module.config.attention_probs_dropout_prob
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, (1, 1, length_q, length_k))
  return keep.astype(module.dtype) / jnp.asarray(keep_prob, dtype=module.dtype)


def _self_attention(module, hidden_states, attention_mask, layer_head_mask, deterministic: bool):
  """FlaxBertSelfAttention.__call__'s result for plain bidirectional self-attention."""
  q = module._split_heads(module.query(hidden_states))
  k = module._split_heads(module.key(hidden_states))
  v = module._split_heads(module.value(hidden_states))
  bias = None
  if attention_mask is not None:
    mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
    bias = jax.lax.select(mask > 0, jnp.full(mask.shape, 0.0).astype(module.dtype),
                          jnp.full(mask.shape, jnp.finfo(module.dtype).min).astype(module.dtype))
  multiplier = None
  if not deterministic and module.config.attention_probs_dropout_prob > 0.0:
    multiplier = _dropout_multiplier(module, q.shape[1], k.shape[1])
  if layer_head_mask is not None:  # Hugging Face's models pass one of ones when given none
    per_head = layer_head_mask.astype(module.dtype).reshape(1, -1, 1, 1)
    multiplier = per_head if multiplier is None else multiplier * per_head
  out = attention(q, k, v, bias, multiplier)
  return (out.reshape(out.shape[:2] + (-1,)),)


def interceptor(next_fun, args, kwargs, context):
  """A flax method interceptor: BERT-family self-attention calls take `attention`."""
  module = context.module
  if context.method_name != "__call__" or type(module).__name__ not in _BERT_SELF_ATTENTION:
    return next_fun(*args, **kwargs)
  call = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
  call.apply_defaults()
  a = call.arguments
  if (module.causal or a["key_value_states"] is not None or a["init_cache"]
      or a["output_attentions"]):
    return next_fun(*args, **kwargs)
  return _self_attention(module, a["hidden_states"], a["attention_mask"], a["layer_head_mask"],
                         a["deterministic"])
