"""BERT-family self-attention with a hand-written backward pass: the JAX path.

Why: the batched dots that XLA derives from Hugging Face's einsums have forms that XLA's CPU
matmul library refuses or runs slowly (dK = dS^T Q contracts the first axis of its left
operand; P V became (V^T P^T)^T), and the broadcast dropout mask is materialised at full
[batch, heads, q, k] size. Here every dot is a plain batched [m, k] x [k, n] product: the small
[batch, length, heads, depth] operands are transposed instead of the large [batch, heads, q, k]
ones, and the backward pass reuses the dropped-out probabilities, so the mask is never needed
at full size. The measurements are in benchmarks/README.md.

The values are Hugging Face's FlaxBertSelfAttention's: the same projections (so LoRA's Dense
interceptor still applies), the same bias for padding, the same dropout masks, drawn from the
module's own `dropout` rng with flax's `dot_product_attention_weights` rules, and the head mask.
Anything this path does not cover (causal or cross attention, a cache, returned attention
weights) falls through to Hugging Face's code. tests/test_attention.py compares values and
gradients with Hugging Face's.

On GPUs and TPUs the attention core goes to `jax.nn.dot_product_attention` instead ("fused"):
cuDNN's fused kernel on NVIDIA GPUs where the dtype and head size allow it, XLA's composition
elsewhere, softmax statistics in float32 either way. Fused kernels have no dropout on the
probabilities: a call that must drop (model.attention_dropout > 0 in training) takes the JAX
path instead.

Packed batches (jaxft.data.packing) pass each row's segment ids (1, 2, ... per example, 0 for
padding) where the padding mask goes; every path then attends within segments only: a
block-diagonal mask for the JAX and fused paths, segment ids for the CPU kernel, and for
Hugging Face's own code a segment bias added inside its attention weights (`_hf_packed`).

`model.attention` picks: "auto" (fused on GPU and TPU; on the CPU the CPU layer's kernel where
it builds and applies, else the JAX path), "fused", "kernel" (jaxft/cpu/attention.py), "jaxft"
(the JAX path) or "hf".
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional

import jax
import jax.numpy as jnp

from jaxft import runtime
from jaxft.errors import fail

# Hugging Face Flax self-attention modules that are copies of BERT's (same fields and call).
_BERT_SELF_ATTENTION = frozenset({
    "FlaxBertSelfAttention", "FlaxRobertaSelfAttention", "FlaxXLMRobertaSelfAttention",
    "FlaxElectraSelfAttention", "FlaxRobertaPreLayerNormSelfAttention"})


def implementation(choice: str, platform: Optional[str] = None,
                   whole_arrays: bool = True) -> str:
  """What `model.attention=choice` runs: "fused", "kernel", "jaxft" or "hf" (see the module
  doc).

  `platform` defaults to JAX's backend; `whole_arrays`: the program sees whole arrays (a
  single-device mesh, or each device's share under pmap). A multi-device jit program would
  gather the kernel's operands onto every device, so it takes the JAX path there.
  """
  platform = platform or jax.default_backend()
  if choice in ("hf", "jaxft", "fused"):
    return choice
  if choice == "auto" and platform != "cpu":
    return "fused"
  if platform != "cpu" or not whole_arrays:
    if choice == "kernel":
      fail("model.attention=kernel runs on the CPU, on one device or with parallel.mode=pmap; "
           "use model.attention=auto (or jaxft) here")
    return "jaxft"
  reason = _kernel_unavailable()
  if reason is None:
    return "kernel"
  if choice == "kernel":
    fail(f"model.attention=kernel: {reason}; use model.attention=auto (or jaxft)")
  return "jaxft"


def _kernel_unavailable() -> Optional[str]:
  """Why the CPU layer's kernel cannot run in this process, or None when it can."""
  try:
    from jaxft import cpu
    from jaxft.cpu import attention as cpu_attention, native
  except ImportError:
    return "the CPU layer (jaxft/cpu) is not installed"
  if not cpu.enabled():
    return f"the CPU layer is switched off ({cpu.SWITCH}=0)"
  try:
    cpu_attention.targets()
  except native.BuildError as e:
    runtime.warn_once(f"the fused CPU attention kernel is not available ({e}); using the JAX "
                      "attention, which is slower on the CPU")
    return f"the attention kernel cannot be built here: {e}"
  return None


def custom_call_targets() -> tuple[str, ...]:
  """The custom-call targets of attention kernels this process has registered (the CPU layer's,
  once loaded): what jax.export must be told to accept."""
  cpu_attention = sys.modules.get("jaxft.cpu.attention")
  return cpu_attention.registered_targets() if cpu_attention is not None else ()


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
  """softmax(q k^T / sqrt(depth) + bias) per head, [batch, heads, q, k], in q's dtype; the
  softmax itself in float32 (its sums lose whole digits in bfloat16)."""
  scores = jnp.matmul(_heads(q) / _sqrt_depth(q), _heads_depth_first(k))
  if bias is not None:
    scores = scores + bias
  return jax.nn.softmax(scores.astype(jnp.float32)).astype(q.dtype)


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


def _padding_bias(attention_mask: Optional[jax.Array], dtype) -> Optional[jax.Array]:
  """Hugging Face's additive bias: 0 for real keys, the dtype's lowest value for padding."""
  if attention_mask is None:
    return None
  mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
  return jax.lax.select(mask > 0, jnp.full(mask.shape, 0.0).astype(dtype),
                        jnp.full(mask.shape, jnp.finfo(dtype).min).astype(dtype))


def segment_mask(segments: jax.Array) -> jax.Array:
  """[batch, 1, q, k]: True where query and key belong to the same example of a packed row
  (padding, segment 0, attends to padding only, so no row is empty)."""
  return segments[:, None, :, None] == segments[:, None, None, :]


def _segment_bias(segments: jax.Array, dtype) -> jax.Array:
  """The additive form of `segment_mask`: 0 within a segment, the dtype's lowest elsewhere."""
  return jnp.where(segment_mask(segments), jnp.zeros((), dtype), jnp.finfo(dtype).min)


# What `fused_attention` ran while tracing ("cudnn", "xla"): a device check reports it.
fused_implementations: set[str] = set()


def _cudnn_applies(q: jax.Array) -> bool:
  """cuDNN's fused attention: NVIDIA GPUs, 16-bit floats, head depth a multiple of 8 to 128."""
  depth = q.shape[-1]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and depth % 8 == 0 and depth <= 128)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    attention_mask: Optional[jax.Array], heads: Optional[jax.Array],
                    packed: bool = False) -> jax.Array:
  """Attention mixing by jax.nn.dot_product_attention, [batch, length, heads, depth] in and
  out: padding keys masked (`attention_mask` [batch, length]; `packed`: it holds segment ids,
  and attention stays within segments), each head's output scaled by `heads` (the head mask,
  broadcasting to [1, heads, 1, 1]); no dropout."""
  out = None
  if packed:
    mask = segment_mask(attention_mask)
    implementation = "cudnn" if _cudnn_applies(q) else "xla"
    try:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
      fused_implementations.add(implementation)
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
      fused_implementations.add("xla")
  elif _cudnn_applies(q):
    # jaxft's batches are right-padded, so a key length per row is the padding mask (at least
    # 1: a row of padding, weight 0 in the loss, must not produce NaN).
    lengths = None
    if attention_mask is not None:
      lengths = jnp.maximum(jnp.sum(attention_mask > 0, axis=-1), 1).astype(jnp.int32)
    try:
      out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                         implementation="cudnn")
      fused_implementations.add("cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      out = None  # a shape or version cuDNN does not take: XLA's composition below
  if out is None:
    mask = None if attention_mask is None else (attention_mask > 0)[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    fused_implementations.add("xla")
  if heads is not None:
    out = out * jnp.swapaxes(heads, 1, 2).astype(out.dtype)  # [1, 1, heads, 1]
  return out


def _self_attention(module, hidden_states, attention_mask, layer_head_mask, deterministic: bool,
                    implementation: str, packed: bool):
  """FlaxBertSelfAttention.__call__'s result for plain bidirectional self-attention, by
  `implementation` ("fused", "kernel", "jaxft"; where "fused" or "kernel" does not apply to a
  call, by the JAX path); `packed`: `attention_mask` holds segment ids."""
  q = module._split_heads(module.query(hidden_states))
  k = module._split_heads(module.key(hidden_states))
  v = module._split_heads(module.value(hidden_states))
  dropout = None
  if not deterministic and module.config.attention_probs_dropout_prob > 0.0:
    dropout = _dropout_multiplier(module, q.shape[1], k.shape[1])
  heads = None
  if layer_head_mask is not None:  # Hugging Face's models pass one of ones when given none
    heads = layer_head_mask.astype(module.dtype).reshape(1, -1, 1, 1)
  if implementation == "fused" and dropout is None:
    out = fused_attention(q, k, v, attention_mask, heads, packed)
  else:
    multiplier = heads if dropout is None else (dropout if heads is None else dropout * heads)
    out = None
    if implementation == "kernel":
      from jaxft.cpu import attention as cpu_attention  # chosen only where it loads
      if packed:
        out = cpu_attention.fused_attention(q, k, v, None, multiplier, segments=attention_mask)
      else:
        out = cpu_attention.fused_attention(q, k, v, _padding_bias(attention_mask, module.dtype),
                                            multiplier)
    if out is None:
      bias = (_segment_bias(attention_mask, module.dtype) if packed
              else _padding_bias(attention_mask, module.dtype))
      out = attention(q, k, v, bias, multiplier)
  return (out.reshape(out.shape[:2] + (-1,)),)


def _hf_packed(next_fun, module, args, kwargs, segments):
  """Hugging Face's own self-attention on a packed row. Its layer turns the mask into a bias
  per key, which cannot hold a block-diagonal mask, so for this call the attention-weights
  function its module calls gets the segment bias added (and is put back after)."""
  hf_module = sys.modules[type(module).__module__]
  weights_fn = hf_module.dot_product_attention_weights

  def with_segments(query, key, bias=None, **kw):
    extra = _segment_bias(segments, query.dtype)
    return weights_fn(query, key, bias=extra if bias is None else bias + extra, **kw)

  hf_module.dot_product_attention_weights = with_segments
  try:
    return next_fun(*args, **kwargs)
  finally:
    hf_module.dot_product_attention_weights = weights_fn


def interceptor(next_fun, args, kwargs, context, implementation: str = "jaxft",
                packed: bool = False):
  """A flax method interceptor: BERT-family self-attention calls take `implementation`, and
  with `packed` attend within the segments their attention mask holds (`interceptor_for`
  binds both)."""
  module = context.module
  if context.method_name != "__call__" or type(module).__name__ not in _BERT_SELF_ATTENTION:
    return next_fun(*args, **kwargs)
  call = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
  call.apply_defaults()
  a = call.arguments
  if (module.causal or a["key_value_states"] is not None or a["init_cache"]
      or a["output_attentions"]):
    if packed:
      fail("packed batches take plain bidirectional self-attention only; set "
           "data.packing=off for this model")
    return next_fun(*args, **kwargs)
  if implementation == "hf":
    return _hf_packed(next_fun, module, args, kwargs, a["attention_mask"])
  return _self_attention(module, a["hidden_states"], a["attention_mask"], a["layer_head_mask"],
                         a["deterministic"], implementation, packed)


def interceptor_for(implementation: str, packed: bool = False):
  """The interceptor for `implementation` ("fused", "kernel" or "jaxft"; "hf" with
  `packed`)."""
  return functools.partial(interceptor, implementation=implementation, packed=packed)
