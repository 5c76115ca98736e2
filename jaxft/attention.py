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

On the CPU the same values come faster still from a fused C++ kernel
(jaxft/native/attention_cpu.cc, built on first use by jaxft.native): each (batch row, heads)
task computes scores, softmax, dropout and mixing in one pass that stays in the core's cache,
keeps only each row's softmax statistics for the backward pass (not the [batch, heads, q, k]
probabilities), and runs asynchronously beside the rest of the step. Measured on the 2-core
EPYC, in turns in one process: the attention core forward and backward at 32 x 128 in 24.5 ms
per layer against 38-55 ms; the whole MiniLM train step 1.86 s against 1.93 s at 32 x 128,
2.15 s against 2.51 s at 8 x 512, 1-3% faster at 32 x 16-56. It takes float32 with a head depth
that is a multiple of 16, in programs that hold whole arrays (one device, or each device under
pmap); anything else takes the JAX path.

`model.attention` picks: "auto" (the kernel on the CPU where it builds and applies, else the
JAX path; Hugging Face's on GPU and TPU, whose libraries take transposed operands natively and
where neither has been measured), "kernel", "jaxft" (the JAX path) or "hf".
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from jaxft import native
from jaxft.errors import fail

ATTENTIONS = ("auto", "kernel", "jaxft", "hf")

# Hugging Face Flax self-attention modules that are copies of BERT's (same fields and call).
_BERT_SELF_ATTENTION = frozenset({
    "FlaxBertSelfAttention", "FlaxRobertaSelfAttention", "FlaxXLMRobertaSelfAttention",
    "FlaxElectraSelfAttention", "FlaxRobertaPreLayerNormSelfAttention"})


def implementation(choice: str, platform: Optional[str] = None,
                   whole_arrays: bool = True) -> str:
  """What `model.attention=choice` runs: "kernel", "jaxft" or "hf" (see the module doc).

  `platform` defaults to JAX's backend; `whole_arrays`: the program sees whole arrays (a
  single-device mesh, or each device's share under pmap). A multi-device jit program would
  gather the kernel's operands onto every device, so it takes the JAX path there.
  """
  platform = platform or jax.default_backend()
  if choice == "hf" or (choice == "auto" and platform != "cpu"):
    return "hf"
  if choice == "jaxft":
    return "jaxft"
  if platform != "cpu" or not whole_arrays:
    if choice == "kernel":
      fail("model.attention=kernel runs on the CPU, on one device or with parallel.mode=pmap; "
           "use model.attention=auto (or jaxft) here")
    return "jaxft"
  try:
    native.attention_targets()
  except native.BuildError as e:
    if choice == "kernel":
      fail(f"model.attention=kernel: the attention kernel cannot be built here: {e}; use "
           "model.attention=auto (or jaxft)")
    _warn_once(f"jaxft: the fused CPU attention kernel is not available ({e}); using the JAX "
               "attention, which is slower on the CPU")
    return "jaxft"
  return "kernel"


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


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


def _kernel_operands(q: jax.Array, bias: Optional[jax.Array],
                     multiplier: Optional[jax.Array]):
  """(bias, multiplier) in the kernel's layout, [batch or 0, length] and [heads or 1 or 0,
  length, length] (0 rows: none), or None where the kernel does not apply."""
  batch, length, heads, depth = q.shape
  if q.dtype != jnp.float32 or depth % 16:
    return None
  if bias is None:
    bias = jnp.zeros((0, length), q.dtype)
  elif bias.shape == (batch, 1, 1, length):
    bias = bias.reshape(batch, length).astype(q.dtype)
  else:
    return None
  if multiplier is None:
    return bias, jnp.zeros((0, length, length), q.dtype)
  if multiplier.ndim != 4 or multiplier.shape[0] != 1 or multiplier.shape[1] not in (1, heads):
    return None
  per_head = multiplier.shape[1]
  multiplier = jnp.broadcast_to(multiplier, (1, per_head, length, length))
  return bias, multiplier.reshape(per_head, length, length).astype(q.dtype)


@jax.custom_vjp
def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                     multiplier: jax.Array) -> jax.Array:
  """`attention` by the fused C++ kernel; bias and multiplier in `_kernel_operands`' layout."""
  return _kernel_forward(q, k, v, bias, multiplier)[0]


def _kernel_forward(q, k, v, bias, multiplier):
  forward, _ = native.attention_targets()
  batch, length, heads, _ = q.shape
  stats = jax.ShapeDtypeStruct((batch, heads, length, 2), q.dtype)  # each row's max, 1 / sum
  out, stats = jax.ffi.ffi_call(forward, (jax.ShapeDtypeStruct(q.shape, q.dtype), stats))(
      q, k, v, bias, multiplier)
  return out, (q, k, v, bias, multiplier, stats)


def _kernel_backward(residuals, g):
  q, k, v, bias, multiplier, stats = residuals
  _, backward = native.attention_targets()
  like_q = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dq, dk, dv = jax.ffi.ffi_call(backward, (like_q, like_q, like_q))(q, k, v, bias, multiplier,
                                                                     stats, g)
  return dq, dk, dv, None, None


kernel_attention.defvjp(_kernel_forward, _kernel_backward)


def _dropout_multiplier(module, length_q: int, length_k: int) -> jax.Array:
  """flax's broadcast attention dropout, drawn as `dot_product_attention_weights` draws it."""
  rate = module.config.attention_probs_dropout_prob
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, (1, 1, length_q, length_k))
  return keep.astype(module.dtype) / jnp.asarray(keep_prob, dtype=module.dtype)


def _self_attention(module, hidden_states, attention_mask, layer_head_mask, deterministic: bool,
                    kernel: bool):
  """FlaxBertSelfAttention.__call__'s result for plain bidirectional self-attention; by the
  fused kernel where `kernel` and it applies, else by `attention`."""
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
  operands = _kernel_operands(q, bias, multiplier) if kernel else None
  if operands is not None:
    out = kernel_attention(q, k, v, *operands)
  else:
    out = attention(q, k, v, bias, multiplier)
  return (out.reshape(out.shape[:2] + (-1,)),)


def interceptor(next_fun, args, kwargs, context, kernel: bool = False):
  """A flax method interceptor: BERT-family self-attention calls take `attention` (or the
  kernel, with `kernel`; `interceptor_for` binds it)."""
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
                         a["deterministic"], kernel)


def interceptor_for(implementation: str):
  """The interceptor for `implementation` ("jaxft" or "kernel", see `implementation`)."""
  return functools.partial(interceptor, kernel=implementation == "kernel")
