"""Parameter-efficient fine-tuning as parameter-subtree masking.

Every method is one mechanism: first-match (regex, trainable) rules over parameter paths
(jaxft.rules) split the model's parameters into a trainable tree (differentiated, with optimizer
state, checkpointed) and a frozen tree (a constant argument of the step, loaded from the base
model). Methods that add parameters put them in the trainable tree under their own key.

  none     everything trainable
  bitfit   biases (and the task head) only
  freeze   what `peft.trainable_rules` marks, e.g. the top layers; by default the head only
  lora     low-rank factors A [in, r] and B [r, out] for every kernel matched by
           `peft.lora.targets` ("lora"); B starts at zero. With `peft.lora.use_dora`, DoRA: a
           magnitude per output column rescales the column-normalised W + s A B.
  ia3      scaling vectors, ones at the start ("ia3"): keys and values at their output, the two
           output/dense projections at their input (Hugging Face PEFT's BERT placement)
  adapter  bottleneck MLPs x + up(act(down(x))) on the outputs of the attention and feed-forward
           sublayers (houlsby) or the feed-forward one (pfeiffer); up starts at zero ("adapter")
  prompt   learned embeddings of virtual tokens placed before every example ("prompt")
  prefix   learned keys and values of virtual tokens in every layer's attention ("prefix")

Methods join with "+" (e.g. "lora+bitfit"). They are applied at apply time, without rewriting
the Hugging Face modules: one flax method interceptor edits the Dense layers and the word
embeddings they name. Prompt and prefix tuning need positions for their virtual tokens: the
data pipeline adds them to every example (jaxft.data.encode) with token ids -1, -2, ...; the
interceptor replaces their word embeddings (prompt) or their keys and values in every layer
(prefix: their places come after the text, so that the text keeps its first token for the
pooler; what the virtual places compute themselves is never read).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft import rules as rules_lib
from jaxft.config import LORA_ALL_LINEAR, peft_methods, virtual_tokens
from jaxft.errors import fail

LORA_KEY, IA3_KEY, ADAPTER_KEY, PROMPT_KEY, PREFIX_KEY = (
    "lora", "ia3", "adapter", "prompt", "prefix")
METHOD_KEYS = (LORA_KEY, IA3_KEY, ADAPTER_KEY, PROMPT_KEY, PREFIX_KEY)
# The Dense outputs each adapter kind follows (BERT-family names).
ADAPTER_TARGETS = {"houlsby": r".*layer/\d+/(attention/)?output/dense/kernel",
                   "pfeiffer": r".*layer/\d+/output/dense/kernel"}
_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "swish": jax.nn.swish,
                "tanh": jnp.tanh}


def trainable_rules(peft_config) -> tuple:
  """The (regex, trainable) rules over the base model's parameters; user rules come first.
  Parameters a method adds are trainable whatever the rules."""
  methods = peft_methods(peft_config.method)
  user = tuple(tuple(r) for r in peft_config.trainable_rules)
  if not methods:
    return user + ((r".*", True),)
  head = ((peft_config.head_pattern, True),) if peft_config.train_head else ()
  bitfit = ((r".*/bias", True),) if "bitfit" in methods else ()
  return user + head + bitfit + ((r".*", False),)


def adds_parameters(method: str) -> bool:
  return bool(peft_methods(method) - {"bitfit", "freeze"})


def split_params(params: dict, rules: Sequence, method: str) -> tuple[dict, dict]:
  """(trainable, frozen) trees by first-match rules; an error when nothing would train."""
  flat = traverse_util.flatten_dict(params)
  paths = [rules_lib.path(k) for k in flat]
  for pattern, value in rules:
    if pattern != r".*" and value:
      rules_lib.check_matches(pattern, paths, "peft.trainable_rules")
  trainable, frozen = {}, {}
  for (key, value), path in zip(flat.items(), paths):
    is_trainable = rules_lib.first_match(path, rules, False)
    (trainable if is_trainable else frozen)[key] = value
  if not trainable and not adds_parameters(method):
    fail(f"peft.method={method} with these rules leaves no parameter trainable; add a "
         "(pattern, True) rule to peft.trainable_rules, e.g. for the top layer "
         f"'.*layer/5/.*'; parameter names look like {paths[:3]}")
  return (traverse_util.unflatten_dict(trainable) if trainable else {},
          traverse_util.unflatten_dict(frozen) if frozen else {})


def init_methods(frozen: dict, peft_config, hf_config, tokenizer, seed: int) -> dict:
  """The parameters the configured methods add, by method key (host arrays)."""
  methods = peft_methods(peft_config.method)
  out = {}
  if "lora" in methods:
    out[LORA_KEY] = init_lora(frozen, peft_config.lora, peft_config.head_pattern, seed)
  if "ia3" in methods:
    out[IA3_KEY] = init_ia3(frozen, peft_config.ia3)
  if "adapter" in methods:
    out[ADAPTER_KEY] = init_adapters(frozen, peft_config.adapter, seed)
  if "prompt" in methods:
    out[PROMPT_KEY] = init_prompt(frozen, peft_config.prompt, tokenizer, seed)
  if "prefix" in methods:
    _check_prefix_targets(frozen, int(hf_config.num_hidden_layers))
    out[PREFIX_KEY] = init_prefix(peft_config.prefix, hf_config, seed)
  return out


def _check_prefix_targets(params: dict, layers: int) -> None:
  """Prefix tuning replaces what the key and value projections of every layer compute."""
  paths = rules_lib.leaf_paths(params)
  pattern = r".*layer/(\d+)/attention/self/(key|value)/kernel"
  found = {m.group(1) for m in (re.fullmatch(pattern, p) for p in paths) if m}
  if len(found) != layers:
    fail(f"peft.method=prefix needs BERT-family attention (layer/N/attention/self/key and "
         f"value) in all {layers} layers; this model's parameters look like "
         f"{rules_lib.nearby('attention/key', paths)}: use peft.method=lora")


def _targeted_kernels(params: dict, pattern: str, key: str, check: bool = True):
  """(module keys, kernel) of every 2-D kernel whose path `pattern` matches."""
  flat = traverse_util.flatten_dict(params)
  paths = [rules_lib.path(k) for k in flat]
  if check:
    rules_lib.check_matches(pattern, paths, key)
  found = [(k[:-1], v) for (k, v), p in zip(flat.items(), paths)
           if k[-1] == "kernel" and len(v.shape) == 2 and re.fullmatch(pattern, p)]
  if not found:
    fail(f"config {key} {pattern!r} matches no 2-D kernel; nearby names: "
         f"{rules_lib.nearby(pattern, paths)}")
  return found


def _kaiming_uniform(rng: np.random.Generator, fan_in: int, shape: tuple) -> np.ndarray:
  bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) as torch.nn.Linear and PEFT
  return rng.uniform(-bound, bound, shape).astype(np.float32)


# ---- LoRA ------------------------------------------------------------------------------------
def lora_target_pattern(targets: str, head_pattern: str) -> str:
  if targets == LORA_ALL_LINEAR:
    return r"(?!" + head_pattern + r").*/kernel"
  return targets


def lora_scale(lora_config) -> float:
  if lora_config.use_rslora:
    return float(lora_config.alpha) / math.sqrt(lora_config.rank)
  return float(lora_config.alpha) / lora_config.rank


def init_lora(params: dict, lora_config, head_pattern: str, seed: int) -> dict:
  """A [in, r] ~ Kaiming-uniform (as PEFT), B [r, out] = 0 for each targeted 2-D kernel; with
  DoRA also the magnitude, the column norms of W (so that the start is the pretrained W)."""
  pattern = lora_target_pattern(lora_config.targets, head_pattern)
  rng = np.random.default_rng(seed + 1)
  factors = {}
  for module, kernel in _targeted_kernels(params, pattern, "peft.lora.targets",
                                          lora_config.targets != LORA_ALL_LINEAR):
    fan_in, fan_out = kernel.shape
    factors[module + ("lora_a",)] = _kaiming_uniform(rng, fan_in, (fan_in, lora_config.rank))
    factors[module + ("lora_b",)] = np.zeros((lora_config.rank, fan_out), np.float32)
    if lora_config.use_dora:
      factors[module + ("magnitude",)] = np.linalg.norm(np.asarray(kernel, np.float32), axis=0)
  return traverse_util.unflatten_dict(factors)


def init_ia3(params: dict, ia3_config) -> dict:
  """Ones: an input scale [in] for feed-forward targets, an output scale [out] for the rest."""
  scales = {}
  for module, kernel in _targeted_kernels(params, ia3_config.targets, "peft.ia3.targets"):
    path = rules_lib.path(module + ("kernel",))
    if re.fullmatch(ia3_config.feedforward, path):
      scales[module + ("input_scale",)] = np.ones((kernel.shape[0],), np.float32)
    else:
      scales[module + ("output_scale",)] = np.ones((kernel.shape[1],), np.float32)
  return traverse_util.unflatten_dict(scales)


def init_adapters(params: dict, adapter_config, seed: int) -> dict:
  """down [width, width / reduction] Kaiming-uniform, up zeros: each adapter starts as the
  identity (Houlsby et al. start near it; exactly is what the tests can check)."""
  rng = np.random.default_rng(seed + 2)
  out = {}
  for module, kernel in _targeted_kernels(params, ADAPTER_TARGETS[adapter_config.kind],
                                          f"peft.adapter.kind={adapter_config.kind}"):
    width = kernel.shape[1]
    bottleneck = max(1, width // int(adapter_config.reduction_factor))
    out[module + ("down_kernel",)] = _kaiming_uniform(rng, width, (width, bottleneck))
    out[module + ("down_bias",)] = np.zeros((bottleneck,), np.float32)
    out[module + ("up_kernel",)] = np.zeros((bottleneck, width), np.float32)
    out[module + ("up_bias",)] = np.zeros((width,), np.float32)
  return traverse_util.unflatten_dict(out)


def word_embeddings(params: dict) -> np.ndarray:
  """The [vocab, width] word-embedding table of a BERT-family parameter tree."""
  for key, value in traverse_util.flatten_dict(params).items():
    if key[-2:] == ("word_embeddings", "embedding"):
      return np.asarray(value, np.float32)
  fail("peft.method=prompt needs the model's word embeddings (embeddings/word_embeddings); "
       "this model has none: use peft.method=lora")


def init_prompt(params: dict, prompt_config, tokenizer, seed: int) -> dict:
  """The embeddings of init_text's tokens, repeated to the count as PEFT's TEXT init does; else
  of tokens drawn from the vocabulary (Lester et al.: better than PEFT's N(0, 1) default)."""
  table = word_embeddings(params)
  count = int(prompt_config.num_virtual_tokens)
  if prompt_config.init_text:
    ids = tokenizer(prompt_config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
      fail(f"config peft.prompt.init_text={prompt_config.init_text!r} has no tokens; give a "
           "text such as 'Is this review positive or negative?' or leave it empty (random)")
    ids = (ids * math.ceil(count / len(ids)))[:count]
  else:
    ids = np.random.default_rng(seed + 3).integers(0, table.shape[0], count)
  return {"embeddings": table[np.asarray(ids)]}


def init_prefix(prefix_config, hf_config, seed: int) -> dict:
  """Keys and values [layers, count, width] ~ N(0, 0.02); or, with a projection, an embedding
  [count, width] and an MLP (Li & Liang) giving them, Linear-initialised as PEFT's."""
  rng = np.random.default_rng(seed + 4)
  layers, width = int(hf_config.num_hidden_layers), int(hf_config.hidden_size)
  count, hidden = int(prefix_config.num_virtual_tokens), int(prefix_config.projection_dim)
  if not hidden:
    return {"keys": rng.normal(0, 0.02, (layers, count, width)).astype(np.float32),
            "values": rng.normal(0, 0.02, (layers, count, width)).astype(np.float32)}
  return {"embedding": rng.normal(0, 1.0, (count, width)).astype(np.float32),
          "in_kernel": _kaiming_uniform(rng, width, (width, hidden)),
          "in_bias": _kaiming_uniform(rng, width, (hidden,)),
          "out_kernel": _kaiming_uniform(rng, hidden, (hidden, layers * 2 * width)),
          "out_bias": _kaiming_uniform(rng, hidden, (layers * 2 * width,))}


def prefix_keys_values(prefix: dict) -> tuple[jax.Array, jax.Array]:
  """[layers, count, width] keys and values; an MLP's are computed (and dropped at export)."""
  if "keys" in prefix:
    return prefix["keys"], prefix["values"]
  hidden = jnp.tanh(prefix["embedding"] @ prefix["in_kernel"] + prefix["in_bias"])
  out = hidden @ prefix["out_kernel"] + prefix["out_bias"]  # [count, layers * 2 * width]
  count, width = prefix["embedding"].shape
  out = jnp.transpose(out.reshape(count, -1, 2, width), (2, 1, 0, 3))  # PEFT's layout
  return out[0], out[1]


# ---- applying the methods --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
  """What applying the methods needs beyond their parameters."""
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  adapter_activation: str = "relu"
  virtual_tokens: int = 0
  # The base model's key ("bert"): a mean-pooled model runs its base module alone, whose module
  # paths lack it, while the methods' trees are keyed by full parameter paths.
  base_prefix: str = ""


def settings(peft_config, base_prefix: str = "") -> Settings:
  return Settings(lora_scale(peft_config.lora), float(peft_config.lora.dropout),
                  peft_config.adapter.activation, virtual_tokens(peft_config)[0], base_prefix)


@dataclasses.dataclass(frozen=True)
class _Virtual:
  """Where a batch's virtual tokens are ([batch, length] bool) and which each is."""
  mask: jax.Array
  index: jax.Array


def _virtual(input_ids: jax.Array, count: int) -> _Virtual:
  return _Virtual(input_ids < 0, jnp.clip(-input_ids - 1, 0, count - 1))


def _lookup(tree: Optional[dict], path: tuple) -> Optional[dict]:
  """The leaves a method keeps for the module at `path`, or None."""
  for part in path:
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  if isinstance(tree, dict) and tree and not any(isinstance(v, dict) for v in tree.values()):
    return tree
  return None


def _layer_index(path: tuple) -> Optional[int]:
  for i, part in enumerate(path[:-1]):
    if part == "layer" and str(path[i + 1]).isdigit():
      return int(path[i + 1])
  return None


def _dropped(x: jax.Array, rate: float, rng: Optional[jax.Array], path: tuple) -> jax.Array:
  key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _lora_out(out, x, factors: dict, module, s: Settings, rng, train: bool) -> jax.Array:
  """LoRA: out + s x A B. DoRA (Liu et al., as PEFT): m / |W + s A B| (x W + s x A B) + b,
  the norm per output column and held constant in the backward pass, as the paper does."""
  if train and s.lora_dropout > 0.0:
    x = _dropped(x, s.lora_dropout, rng, tuple(module.path))
  a, b = factors["lora_a"], factors["lora_b"]
  delta = (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * s.lora_scale
  if "magnitude" not in factors:
    return out + delta.astype(out.dtype)
  weights = module.variables["params"]
  merged = jnp.asarray(weights["kernel"], jnp.float32) + s.lora_scale * (
      a.astype(jnp.float32) @ b.astype(jnp.float32))
  norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))
  factor = (factors["magnitude"] / norm).astype(out.dtype)
  bias = weights.get("bias")
  bias = jnp.zeros((), out.dtype) if bias is None else bias.astype(out.dtype)
  return factor * (out - bias + delta.astype(out.dtype)) + bias


def _adapter_out(out, leaves: dict, activation: str) -> jax.Array:
  down = out @ leaves["down_kernel"].astype(out.dtype) + leaves["down_bias"].astype(out.dtype)
  up = _ACTIVATIONS[activation](down) @ leaves["up_kernel"].astype(out.dtype)
  return out + up + leaves["up_bias"].astype(out.dtype)


def interceptor(tree: dict, s: Settings, rng: Optional[jax.Array], train: bool,
                virtual: Optional[_Virtual]):
  """A flax interceptor applying the methods' parameters in `tree` (keyed by METHOD_KEYS)."""
  prompt = tree.get(PROMPT_KEY)
  prefix = prefix_keys_values(tree[PREFIX_KEY]) if PREFIX_KEY in tree else None

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Embed) and module.name == "word_embeddings" and virtual:
      out = next_fun(jnp.maximum(args[0], 0), *args[1:], **kwargs)  # ids -1, -2, ...: virtual
      if prompt is None:
        return out
      vectors = prompt["embeddings"][virtual.index].astype(out.dtype)
      return jnp.where(virtual.mask[..., None], vectors, out)
    if not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)

    def find(key: str) -> Optional[dict]:
      found = _lookup(tree.get(key), path)
      if found is None and s.base_prefix:
        found = _lookup(tree.get(key), (s.base_prefix,) + path)
      return found

    x = args[0]
    ia3 = find(IA3_KEY) or {}
    if "input_scale" in ia3:
      x = x * ia3["input_scale"].astype(x.dtype)
    out = next_fun(x, *args[1:], **kwargs)
    lora = find(LORA_KEY)
    if lora is not None:
      out = _lora_out(out, x, lora, module, s, rng, train)
    if "output_scale" in ia3:
      out = out * ia3["output_scale"].astype(out.dtype)
    adapter = find(ADAPTER_KEY)
    if adapter is not None:
      out = _adapter_out(out, adapter, s.adapter_activation)
    layer = _layer_index(path)
    if prefix is not None and virtual and layer is not None and path[-2:] in (
        ("self", "key"), ("self", "value")):
      learned = prefix[0 if path[-1] == "key" else 1][layer][virtual.index]
      out = jnp.where(virtual.mask[..., None], learned.astype(out.dtype), out)
    return out

  return intercept


def with_methods(fn: Callable, s: Settings) -> Callable:
  """Wraps a (params, batch, rng, train) -> outputs function to apply the methods' parameters
  (params[key] for key in METHOD_KEYS) to the base model's."""

  def wrapped(params, batch, rng, train):
    tree = {k: params[k] for k in METHOD_KEYS if params.get(k)}
    if not tree and not s.virtual_tokens:
      return fn(params, batch, rng, train)
    rest = {k: v for k, v in params.items() if k not in METHOD_KEYS}
    method_rng = None
    if train and s.lora_dropout > 0.0:
      rng, method_rng = jax.random.split(rng)
    virtual = _virtual(batch["input_ids"], s.virtual_tokens) if s.virtual_tokens else None
    if PREFIX_KEY in tree:
      batch = {**batch, "position_ids": prefix_position_ids(batch, s.virtual_tokens)}
    with nn.intercept_methods(interceptor(tree, s, method_rng, train, virtual)):
      return fn(rest, batch, rng, train)

  return wrapped


def prefix_position_ids(batch: dict, count: int) -> jax.Array:
  """The text's positions after `count` prefix positions, as Hugging Face models count them
  when given past keys and values (so as PEFT's prefix tuning and P-tuning v2 run); the virtual
  tokens themselves, after the text, at 0 (what they compute is never read)."""
  ids = batch["input_ids"]
  text = batch.get("position_ids")  # packed rows: restarting at each example
  if text is None:
    text = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
  return jnp.where(ids < 0, 0, text + count).astype(jnp.int32)


# ---- merging (export) ------------------------------------------------------------------------
UNMERGEABLE = {ADAPTER_KEY: "bottleneck adapters add layers", PROMPT_KEY: "prompt tuning "
               "adds input positions", PREFIX_KEY: "prefix tuning adds keys and values"}


def merge(params: dict, methods: dict, s: Settings) -> dict:
  """Full parameters with LoRA, DoRA and IA3 folded into the kernels (and biases) they edit;
  host arrays. Methods that cannot fold in (UNMERGEABLE) are an error for the caller to avoid."""
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
  for key in list(flat):
    if key[-1] != "kernel":
      continue
    module = key[:-1]
    kernel = flat[key]
    # In the order the interceptor applies them: IA3's input scale multiplies the input of
    # both W and the LoRA branch; DoRA's norm is that of W + s A B alone.
    lora = _lookup(methods.get(LORA_KEY), module)
    if lora is not None:
      kernel = kernel + s.lora_scale * (np.asarray(lora["lora_a"]) @ np.asarray(lora["lora_b"]))
      if "magnitude" in lora:
        kernel = kernel * (np.asarray(lora["magnitude"]) / np.linalg.norm(kernel, axis=0))
    ia3 = _lookup(methods.get(IA3_KEY), module) or {}
    if "input_scale" in ia3:
      kernel = np.asarray(ia3["input_scale"])[:, None] * kernel
    if "output_scale" in ia3:
      kernel = kernel * np.asarray(ia3["output_scale"])[None, :]
      if module + ("bias",) in flat:
        flat[module + ("bias",)] = flat[module + ("bias",)] * np.asarray(ia3["output_scale"])
    flat[key] = kernel
  return traverse_util.unflatten_dict(flat)
