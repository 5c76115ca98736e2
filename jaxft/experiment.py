"""What training, evaluation and prediction share for one config: tokenizer, data, model, mesh,
the resolved config, and the state's shapes and shardings.

`build` reads everything once and returns an `Experiment`; its `config` is the resolved one
(label names, bucket lengths, the selection metric, and the platform's compute dtype and
attention dropout filled in), which train writes to config.json so that evaluation,
prediction and resume see what the run used.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jaxft import config as config_lib
from jaxft import (attention, compiled, fewshot, models, optim, parallel, peft, rules,
                   step as step_lib, tasks)
from jaxft.data import batching, encode, mlm, order, packing
from jaxft.data.encode import Encoded, read_split
from jaxft.errors import fail

SPLIT_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


@dataclasses.dataclass
class Experiment:
  config: object  # resolved: see the module doc
  model_dir: str
  tokenizer: object
  task: tasks.Task
  model: models.Model
  mesh: jax.sharding.Mesh
  buckets: tuple[int, ...]
  trainable_init: dict  # the initial trainable tree (all params, or LoRA factors + head, ...)
  frozen_init: dict  # the rest of the pretrained params: never differentiated or checkpointed
  logits: Callable  # (params, batch, rng, train) -> logits over the combined tree
  platform: str  # the JAX platform whose defaults it took ("cpu", "gpu", "tpu")
  train_data: Optional[Encoded] = None
  # (params, batch, rng, train) -> [batch, width] sentence embeddings (model.pooling=mean)
  embeddings: Optional[Callable] = None
  few_shot_indices: Optional[np.ndarray] = None  # data.examples_per_class: rows of the file
  _frozen_on_devices: Optional[dict] = None

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.task.label_names

  # ---- data -------------------------------------------------------------------------------
  def split_path(self, split: str) -> str:
    key = SPLIT_KEYS.get(split)
    if key is None:
      fail(f"unknown split {split!r}; use one of {list(SPLIT_KEYS)}")
    path = self.config.data[key]
    if not path:
      fail(f"config data.{key} is not set, so there is no {split} split; set "
           f"--config.data.{key}=PATH")
    return path

  def load_split(self, split: str) -> Encoded:
    if split == "train" and self.train_data is not None:
      return self.train_data
    max_rows = (self.config.data.max_train_examples if split == "train"
                else self.config.data.max_eval_examples)
    return self.read(self.split_path(split), max_rows)

  def read(self, path: str, max_rows=None, labelled: bool = True) -> Encoded:
    data, _ = read_split(path, self.config, self.tokenizer, self.label_names, max_rows,
                         labelled)
    return data

  def encode_texts(self, texts: Sequence[str]) -> Encoded:
    return encode.encode_texts(self.tokenizer, texts, self.config.data.max_seq_length)

  def host_batch(self, data: Encoded, indices: np.ndarray, batch_size: int,
                 epoch: int = mlm.EVAL_EPOCH) -> dict:
    """This process's rows of the global batch at `indices`, padded to a bucket length.

    For mlm, tokens are masked here (jaxft.data.mlm: per example and `epoch`), on the whole
    global batch before it is split between hosts, so every host draws the same masks.
    """
    return self._host_rows(batching.make_batch(data, indices, batch_size, self.buckets), epoch)

  def host_packed_batch(self, data: Encoded, placement: list, shape: packing.Shape,
                        epoch: int = mlm.EVAL_EPOCH) -> dict:
    """This process's rows and example slots of the packed global batch `placement`
    (jaxft.data.packing) in `shape`; mlm masks as in host_batch."""
    return self._host_rows(packing.make_packed_batch(data, placement, shape), epoch)

  def _host_rows(self, batch: dict, epoch: int) -> dict:
    if self.task.kind == "mlm":
      tok = self.tokenizer
      batch = mlm.mask_tokens(batch, self.config.seed, epoch,
                              self.config.task.mlm_probability, tok.mask_token_id,
                              self.model.hf_config.vocab_size, tok.all_special_ids)
    return batching.host_rows(batch, jax.process_index(), jax.process_count())

  def to_mesh(self, host_batch: dict) -> dict:
    """Host arrays as global arrays on the mesh, split over its batch axes (jit steps)."""
    return parallel.to_devices(host_batch, self.mesh)

  @property
  def packing(self) -> str:
    """The resolved data.packing: "off", "examples" or "tokens"."""
    return self.config.data.packing

  def train_order(self, data: Encoded) -> order.TrainOrder:
    """Which examples each training step takes (jaxft.data.order). Packed batches are laid
    out in one block per data-parallel shard and accumulated micro-batch."""
    c = self.config
    _check_packing_groups(c, self.mesh)
    groups = c.data.packing_groups or packing_groups(c, self.mesh)
    return order.TrainOrder(self.packing, data.lengths, c.train.batch_size, c.seed,
                            c.data.bucket_window_batches, c.data.max_seq_length, groups,
                            c.data.packing_rows, c.data.packing_length, c.data.num_buckets)

  # ---- state ------------------------------------------------------------------------------
  def optimizer(self, total_steps: int):
    num_layers = int(getattr(self.model.hf_config, "num_hidden_layers", 0) or 0)
    return optim.make_optimizer(self.config, self.trainable_init, total_steps, num_layers)

  def param_counts(self) -> dict:
    trainable = models.count_params(self.trainable_init)
    frozen = models.count_params(self.frozen_init)
    return {"trainable": trainable, "total": trainable + frozen, "frozen": frozen}

  def param_shardings(self) -> dict:
    """Shardings of the trainable parameters, by parallel.param_rules."""
    return parallel.param_shardings(self.trainable_init, self.mesh,
                                    self.config.parallel.param_rules)

  def abstract_params(self) -> dict:
    """Shapes, dtypes and shardings of the trainable parameters (what inference restores)."""
    return jax.tree_util.tree_map(
        lambda x, sharding: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
        self.trainable_init, self.param_shardings())

  def abstract_state(self, tx) -> dict:
    """Shapes, dtypes and shardings of the train state, computed without allocating it."""
    shapes = jax.eval_shape(lambda p: step_lib.init_state(p, tx, self.config.seed),
                            self.trainable_init)
    shardings = parallel.state_shardings(shapes, self.mesh, self.config.parallel.param_rules, tx)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

  def init_state(self, tx) -> dict:
    """The initial state, created directly with its shardings."""
    abstract = self.abstract_state(tx)
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
    params = jax.device_put(self.trainable_init, shardings["params"])
    init = jax.jit(lambda p: step_lib.init_state(p, tx, self.config.seed),
                   out_shardings=shardings)
    return init(params)

  def frozen_shardings(self) -> dict:
    return parallel.param_shardings(self.frozen_init, self.mesh,
                                    self.config.parallel.param_rules)

  def frozen(self) -> dict:
    """The frozen parameters on the devices, laid out by the same sharding rules (cached)."""
    if self._frozen_on_devices is None:
      self._frozen_on_devices = jax.device_put(self.frozen_init, self.frozen_shardings())
    return self._frozen_on_devices

  def program_cache_key(self, kind: str, **extra) -> Optional[str]:
    """The program-cache prefix (jaxft.compiled) of this experiment's `kind` of step ("train",
    "eval"), `extra` naming what else built it; None where the cache is off. The optimizer's
    run values (seed, learning rate, length, ...) are left out: the step reads them from its
    state, so runs that differ only in them share programs."""
    if compiled.cache_directory() is None:
      return None
    shared = config_lib.replace(self.config, {key: None for key in optim.RUN_VALUE_KEYS +
                                              loop_only_keys(self.config)})
    return compiled.experiment_key(shared, self.model_dir, kind,
                                   labels=list(self.label_names),
                                   attention=self.model.attention, **extra)


def loop_only_keys(config) -> tuple[str, ...]:
  """Config keys that only the training loop reads (logging, evaluation and checkpoint
  intervals, file names): no traced program depends on them, so the program cache leaves them
  out of its keys. Otherwise a run differing from the one that compiled only in, say,
  train.log_every would find JAX's persistent cache (which jaxft does not copy from) and never
  its own, and trace and lower its steps at every start."""
  return (("train.log_every", "train.eval_every", "train.early_stopping_patience",
           "data.train_file", "data.validation_file", "data.test_file",
           "data.max_train_examples", "data.max_eval_examples")
          + tuple(f"checkpoint.{key}" for key in config.checkpoint.keys()))


def build(config, label_names: Optional[Sequence[str]] = None, read_train: bool = True,
          devices: Optional[Sequence] = None, platform: Optional[str] = None) -> Experiment:
  """Loads tokenizer, training data (which fixes the label names), model and mesh for `config`;
  the experiment's config is `config` resolved (see the module doc); `config` is not changed.

  `devices` (default: all) lets a caller run on a subset, e.g. one device in a test;
  `platform` (default: JAX's backend) chooses the platform defaults: compute dtype, attention,
  the step's non-finite guard.
  """
  config_lib.validate(config)
  config = config_lib.with_task_defaults(config)
  model_dir = models.resolve_model_dir(config.model.name_or_path)
  tokenizer = models.load_tokenizer(model_dir, config.model.trust_remote_code,
                                    words_given=config.task.kind == "token_classification")
  if config.data.label_names is not None:
    label_names = tuple(str(n) for n in config.data.label_names)
  train_data, few_shot = None, []
  if read_train:
    subset = None
    if config.data.examples_per_class:
      def subset(labels, names):
        few_shot.extend(fewshot.sample_per_class(
            labels, config.data.examples_per_class,
            _first_set(config.data.few_shot_seed, config.seed), names, config.data.train_file))
        return few_shot
    train_data, label_names = read_split(config.data.train_file, config, tokenizer, label_names,
                                         config.data.max_train_examples, subset=subset)
    distill = config.train.distill
    if distill.transfer_file:  # unlabelled: they learn from the teacher only (jaxft.distill)
      train_data = encode.concatenate(train_data, encode.read_unlabelled_examples(
          distill.transfer_file, config, tokenizer, label_names, distill.max_transfer_examples))
  needs_labels = config.task.kind not in ("regression", "mlm")
  if needs_labels and not label_names:
    fail("the label names are unknown: set data.label_names or give a training file")
  task = tasks.make(config.task.kind, tuple(label_names or ()) if needs_labels else (),
                    config.task.threshold)
  mesh = parallel.make_mesh(dict(config.parallel.mesh), devices)
  whole_arrays = mesh.devices.size == 1 or config.parallel.mode == "pmap"
  platform = platform or jax.default_backend()
  implementation = attention.implementation(config.model.attention, platform, whole_arrays)
  config = config_lib.replace(config, {
      "train.compute_dtype": config_lib.compute_dtype_for(config.train.compute_dtype, platform),
      "data.packing": config_lib.packing_for(config.data.packing, platform)})
  dropout_rate = config.model.attention_dropout
  if dropout_rate is None and implementation == "fused":
    dropout_rate = 0.0  # fused kernels drop nothing: say so, rather than train another model
  model = models.load_model(model_dir, task, config.model.pooling, config.seed,
                            config.train.compute_dtype, config.model.trust_remote_code,
                            implementation, dropout_rate, tuple(config.model.keep_layers))
  config = config_lib.replace(config, {
      "model.attention_dropout": models.attention_dropout(model.hf_config)})
  if task.kind == "regression" and train_data is not None:
    model = _start_at_the_mean(model, train_data.labels, config.peft.head_pattern)
  _check_model_fits(config, tokenizer, model)
  trainable, frozen = peft.split_params(model.params, peft.trainable_rules(config.peft),
                                        config.peft.method)
  trainable = {**trainable, **peft.init_methods(frozen, config.peft, model.hf_config, tokenizer,
                                                 config.seed)}
  applied = peft.settings(config.peft, model.base_prefix)
  logits = peft.with_methods(model.logits, applied)
  embeddings = peft.with_methods(model.embeddings, applied)
  parallel.check_batch_size("train.batch_size", config.train.batch_size //
                            config.train.grad_accum_steps, mesh)
  parallel.check_batch_size("train.eval_batch_size", config.train.eval_batch_size, mesh)
  buckets = _bucket_lengths(config, train_data)
  config = config_lib.replace(config, {"data.label_names": tuple(task.label_names) or None,
                                       "data.bucket_lengths": buckets,
                                       "data.packing_groups": config.data.packing_groups or
                                       packing_groups(config, mesh)})
  if config.data.label_descriptions is not None:
    fewshot.descriptions_by_label(config.data.label_descriptions, task.label_names)  # checked
  return Experiment(config, model_dir, tokenizer, task, model, mesh, buckets, trainable, frozen,
                    logits, platform, train_data,
                    embeddings if config.model.pooling == "mean" else None,
                    np.asarray(few_shot) if few_shot else None)


def _first_set(*values):
  return next(v for v in values if v is not None)


def packing_groups(config, mesh) -> int:
  """The blocks a packed batch needs for this mesh: one per data-parallel shard and
  accumulated micro-batch (jaxft.data.packing)."""
  return parallel.batch_parallelism(mesh) * config.train.grad_accum_steps


def _check_packing_groups(config, mesh) -> None:
  needed = packing_groups(config, mesh)
  groups = config.data.packing_groups
  if config.data.packing != "off" and groups and groups % needed:
    fail(f"config data.packing_groups={groups} (a resumed run records its own) is not a "
         f"multiple of the data-parallel size x train.grad_accum_steps = {needed}; run on a "
         f"mesh whose data-parallel size divides {groups}, or start a new --workdir")


def _bucket_lengths(config, train_data: Optional[Encoded]) -> tuple[int, ...]:
  """The configured bucket lengths; else `data.num_buckets` lengths fitted to the training
  batches of epoch 0 (train records them in config.json, so evaluation and prediction from the
  run's checkpoints pad alike); else, without training data, the fixed ladder."""
  d = config.data
  if d.bucket_lengths or train_data is None or len(train_data) == 0:
    return batching.bucket_lengths(d.max_seq_length, tuple(d.bucket_lengths))
  batches = batching.epoch_batches(train_data.lengths, config.train.batch_size, config.seed, 0,
                                   d.bucket_window_batches)
  return batching.fit_bucket_lengths([int(train_data.lengths[b].max()) for b in batches],
                                     d.max_seq_length, d.num_buckets)


def _start_at_the_mean(model: models.Model, targets: np.ndarray, head_pattern: str):
  """Regression: the head's output bias starts at the mean training target.

  Adam moves a parameter by about the learning rate per step, so a bias starting at 0 needs
  hundreds of steps to reach targets such as STS-B's 0-5 and the early updates go into the
  encoder instead; starting at the mean lets training spend itself on the variation.
  """
  head = ((head_pattern, True),)
  mean = np.full((1,), float(np.nanmean(targets)), np.float32)  # NaN: unlabelled
  params = rules.map_paths(
      lambda path, x: mean if (path.endswith("/bias") and np.shape(x) == (1,)
                               and rules.first_match(path, head, False)) else x, model.params)
  return dataclasses.replace(model, params=params)


def _check_model_fits(config, tokenizer, model: models.Model) -> None:
  vocab = getattr(model.hf_config, "vocab_size", None)
  if vocab is not None and len(tokenizer) > vocab:
    fail(f"the tokenizer ({len(tokenizer)} tokens) does not match the model (vocabulary of "
         f"{vocab}); use the tokenizer saved with the model in {model.model_dir}")
  max_positions = getattr(model.hf_config, "max_position_embeddings", None)
  if max_positions is not None and config.data.max_seq_length > max_positions:
    fail(f"config data.max_seq_length={config.data.max_seq_length} exceeds the model's "
         f"max_position_embeddings={max_positions}; lower it")
