"""What training, evaluation and prediction share for one config: tokenizer, data, model, mesh,
the jitted steps, the state's shapes and shardings, and the evaluation loop.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft import config as config_lib
from jaxft import metrics as metrics_lib
from jaxft import (attention, models, native, optim, parallel, peft, program_cache,
                   step as step_lib, tasks)
from jaxft.data import batching, mlm
from jaxft.data.encode import Encoded, read_split
from jaxft.errors import fail

SPLIT_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


@dataclasses.dataclass
class Experiment:
  config: object
  model_dir: str
  tokenizer: object
  task: tasks.Task
  model: models.Model
  mesh: jax.sharding.Mesh
  buckets: tuple[int, ...]
  trainable_init: dict  # the initial trainable tree (all params, or LoRA factors + head, ...)
  frozen_init: dict  # the rest of the pretrained params: never differentiated or checkpointed
  logits: Callable  # (params, batch, rng, train) -> logits over the combined tree
  train_data: Optional[Encoded] = None
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

  def host_batch(self, data: Encoded, indices: np.ndarray, batch_size: int,
                 mask_key: tuple[int, int] = (mlm.EVAL_EPOCH, 0)) -> dict:
    """This process's rows of the global batch at `indices`, padded to a bucket length.

    For mlm, tokens are masked here from `mask_key` = (epoch, batch index in the epoch), on the
    whole global batch before it is split between hosts, so every host draws the same masks.
    """
    batch = batching.make_batch(data, indices, batch_size, self.buckets)
    if self.task.kind == "mlm":
      tok = self.tokenizer
      batch = mlm.mask_tokens(batch, mlm.rng_for(self.config.seed, *mask_key),
                              self.config.task.mlm_probability, tok.mask_token_id,
                              self.model.hf_config.vocab_size, tok.all_special_ids)
    return batching.host_rows(batch, jax.process_index(), jax.process_count())

  # ---- state ------------------------------------------------------------------------------
  def optimizer(self, total_steps: int):
    num_layers = int(getattr(self.model.hf_config, "num_hidden_layers", 0) or 0)
    return optim.make_optimizer(self.config, self.trainable_init, total_steps, num_layers)

  def param_counts(self) -> dict:
    trainable = models.count_params(self.trainable_init)
    frozen = models.count_params(self.frozen_init)
    return {"trainable": trainable, "total": trainable + frozen, "frozen": frozen}

  def abstract_state(self, tx) -> dict:
    """Shapes, dtypes and shardings of the train state, computed without allocating it."""
    shapes = jax.eval_shape(lambda p: step_lib.init_state(p, tx, self.config.seed),
                            self.trainable_init)
    shardings = parallel.state_shardings(shapes, self.mesh, self.config.parallel.param_rules)
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
    shapes = jax.eval_shape(lambda f: f, self.frozen_init)
    return parallel.state_shardings({"frozen": shapes}, self.mesh,
                                    self.config.parallel.param_rules)["frozen"]

  def frozen(self) -> dict:
    """The frozen parameters on the devices, laid out by the same sharding rules (cached)."""
    if self._frozen_on_devices is None:
      self._frozen_on_devices = jax.device_put(self.frozen_init, self.frozen_shardings())
    return self._frozen_on_devices

  # ---- steps ------------------------------------------------------------------------------
  def trainer(self, tx, schedule, abstract_state: dict, cache_prefix: Optional[str] = None
              ) -> "JitTrainer | PmapTrainer":
    """The train step for `parallel.mode`, with how its state and batches are laid out.
    `cache_prefix`: program_cache_key("train", ...) to keep its programs across runs."""
    if self.config.parallel.mode == "pmap":
      return PmapTrainer(self, tx, schedule, abstract_state)
    return JitTrainer(self, tx, schedule, abstract_state, cache_prefix)

  def jit_eval_step(self, cache_prefix: Optional[str] = None) -> "WidthPrograms":
    return WidthPrograms(step_lib.make_eval_step(self.logits, self.task.eval_outputs),
                         cache_prefix=cache_prefix,
                         out_shardings=parallel.batch_sharding(self.mesh))

  def program_cache_key(self, kind: str, **extra) -> Optional[str]:
    """The program-cache prefix (jaxft.program_cache) of this experiment's `kind` of step
    ("train", "eval"), `extra` naming what else built it (e.g. the schedule's num_steps);
    None where the cache is off."""
    if program_cache.directory() is None:
      return None
    return program_cache.experiment_key(self.config, self.model_dir, kind,
                                        labels=list(self.label_names),
                                        attention=self.model.attention, **extra)

  # ---- evaluation -------------------------------------------------------------------------
  def predict_outputs(self, eval_step: "WidthPrograms", params: dict,
                      data: Encoded) -> dict[str, list]:
    """The task's eval outputs (jaxft.tasks.Task.eval_outputs) of every example of `data`, in
    file order, no example dropped or repeated; per-token outputs cut to each example's length.
    Batches are sorted by length, so they pad little and reuse the training shapes."""
    out: dict[str, list] = {}
    frozen = self.frozen()
    batches = self._eval_batches(data)
    # Widths not compiled yet (a new run's evaluation or prediction) compile all at once.
    compile_in_parallel(eval_step.pending(self.first_eval_batch_of_each_width(data, batches),
                                          self.to_mesh, (params, frozen)))
    lengths = data.lengths
    for number, indices in enumerate(batches):
      outputs = _to_host(eval_step(params, frozen,
                                   self.to_mesh(self._eval_host_batch(data, indices, number))))
      for name, values in outputs.items():
        column = out.setdefault(name, [None] * len(data))
        for row, i in enumerate(indices):
          column[i] = values[row, :lengths[i]] if values.ndim == 3 else values[row]
    return out

  def _eval_batches(self, data: Encoded) -> list[np.ndarray]:
    return batching.eval_batches(data.lengths, self.config.train.eval_batch_size)

  def _eval_host_batch(self, data: Encoded, indices: np.ndarray, number: int) -> dict:
    return self.host_batch(data, indices, self.config.train.eval_batch_size,
                           mask_key=(mlm.EVAL_EPOCH, number))

  def first_eval_batch_of_each_width(self, data: Encoded,
                                     batches: Optional[list[np.ndarray]] = None) -> list[dict]:
    """The first evaluation batch (host arrays) of each padded width of `data`: what compiling
    every evaluation shape ahead of time needs. `batches`: data's evaluation batches, when
    the caller has them."""
    batches = self._eval_batches(data) if batches is None else batches
    maxima = [data.lengths[b].max() for b in batches]
    return [self._eval_host_batch(data, batches[i], int(i))
            for i in batching.first_of_each_width(maxima, self.buckets)]

  def to_mesh(self, host_batch: dict) -> dict:
    """Host arrays as global arrays on the mesh, split over its batch axes (jit steps)."""
    return parallel.to_devices(host_batch, self.mesh)

  def evaluate(self, eval_step, params: dict, data: Encoded) -> dict:
    """The task's metrics (jaxft.tasks.METRICS) of `params` on `data`."""
    return task_metrics(self.task, self.predict_outputs(eval_step, params, data), data)


class _Trainer:
  """What both trainers share: every train and eval shape compiled before training starts."""

  def precompile(self, state: dict, frozen: dict, host_batches: list[dict],
                 eval_step: Optional["WidthPrograms"] = None,
                 eval_host_batches: Sequence[dict] = ()) -> None:
    """Compiles the train step for each batch shape (one per bucket length the data can
    produce) and the eval step for each evaluation shape before training starts, several at
    once: no new shape compiles mid-run, and compiling in parallel threads (XLA releases the
    GIL) overlaps what would be one stall per shape. Each jitted step is traced once for all
    its widths (WidthPrograms.lowering; pmap traces each shape); `step` and `eval_step` then
    call these programs.

    Each program goes to a compiler thread as soon as it is traced, so tracing the next shape
    (Python, holding the GIL) overlaps compiling the previous ones (XLA, without it)."""
    pending = self._step.pending(host_batches, self.device_batch,
                                 (state, self._step_frozen(frozen)))
    if eval_step is not None:
      pending += eval_step.pending(eval_host_batches, self.exp.to_mesh,
                                   (self.params(state), frozen))
    compile_in_parallel(pending)


class JitTrainer(_Trainer):
  """`parallel.mode=jit`: one jitted step; state and batches carry their NamedShardings."""

  def __init__(self, exp: Experiment, tx, schedule, abstract_state: dict,
               cache_prefix: Optional[str] = None):
    self.exp = exp
    fn = step_lib.make_train_step(exp.logits, exp.task.loss, tx, schedule,
                                  exp.config.train.grad_accum_steps,
                                  dropout_rng=exp.config.train.dropout_rng)
    self.state_shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    self._in_shardings = (self.state_shardings, exp.frozen_shardings(),
                          parallel.batch_sharding(exp.mesh))
    self._out_shardings = (self.state_shardings, parallel.replicated(exp.mesh))
    self._step = WidthPrograms(fn, cache_prefix=cache_prefix, in_shardings=self._in_shardings,
                               out_shardings=self._out_shardings, donate_argnums=(0,))

  def place(self, state: dict) -> dict:
    """A fresh or restored state (already laid out by the abstract state's shardings)."""
    return state

  def device_batch(self, host_batch: dict) -> dict:
    return self.exp.to_mesh(host_batch)

  def _step_frozen(self, frozen: dict) -> dict:
    """The frozen parameters as the train step takes them."""
    return frozen

  def step(self, state: dict, frozen: dict, batch: dict):
    return self._step(state, frozen, batch)

  def savable(self, state: dict) -> dict:
    return state

  def params(self, state: dict) -> dict:
    return state["params"]


class PmapTrainer(_Trainer):
  """`parallel.mode=pmap`: the same step under jax.pmap, state replicated on local devices."""

  def __init__(self, exp: Experiment, tx, schedule, abstract_state: dict):
    self.exp = exp
    fn = step_lib.make_train_step(exp.logits, exp.task.loss, tx, schedule,
                                  exp.config.train.grad_accum_steps,
                                  reduce_axis=parallel.PMAP_AXIS,
                                  dropout_rng=exp.config.train.dropout_rng)
    self.state_shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    self._step = WidthPrograms(fn, transform=jax.pmap, axis_name=parallel.PMAP_AXIS,
                               in_axes=(0, 0, 0), donate_argnums=(0,))
    self._frozen = None

  def place(self, state: dict) -> dict:
    return parallel.replicate(state)

  def device_batch(self, host_batch: dict) -> dict:
    return parallel.to_pmap_devices(host_batch)

  def _step_frozen(self, frozen: dict) -> dict:
    if self._frozen is None:  # replicated once, then reused by every step
      self._frozen = parallel.replicate(frozen)
    return self._frozen

  def step(self, state: dict, frozen: dict, batch: dict):
    state, metrics = self._step(state, self._step_frozen(frozen), batch)
    return state, jax.tree_util.tree_map(lambda m: m[0], metrics)  # identical on every device

  def savable(self, state: dict) -> dict:
    """The first replica as global arrays on the mesh, the layout checkpoints are written in."""
    return _on_mesh(parallel.unreplicate(state), self.state_shardings)

  def params(self, state: dict) -> dict:
    return _on_mesh(parallel.unreplicate(state["params"]), self.state_shardings["params"])


def compile_in_parallel(pending: list[tuple["WidthPrograms", int, Callable, Optional[str]]]
                        ) -> None:
  """Compiles each (programs, width, lower, key) of WidthPrograms.pending into
  programs.compiled, in parallel threads (XLA releases the GIL): lowering, in this thread,
  goes in order, so each program compiles while the next is traced. A program in jaxft's
  program cache (`key`) is loaded instead, with no tracing or lowering at all."""
  threads = max(1, min(len(pending), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    jobs = []
    for programs, width, lower, key in pending:
      if program_cache.exists(key):
        job = pool.submit(program_cache.load, key)
      else:
        job = pool.submit(program_cache.compile_program, lower(), key)
      jobs.append((programs, width, lower, key, job))
    for programs, width, lower, key, job in jobs:
      compiled = job.result()
      if compiled is None:  # a stored program that did not load: compile it after all
        compiled = program_cache.compile_program(lower(), key)
      programs.compiled[width] = compiled


def _width(batch: dict) -> int:
  """The padded length: the last axis of the token ids ([rows, width], or pmap's
  [devices, rows per device, width])."""
  return batch["input_ids"].shape[-1]


class WidthPrograms:
  """`jax.jit(fn, **jit_kwargs)` (or `transform`, e.g. jax.pmap) for a step
  `fn(*fixed_args, batch)`, with programs compiled ahead of time for chosen batch widths
  (`pending`, run by the trainers' precompile): a call runs the program of its batch's width,
  else the jitted function (which compiles on first use)."""

  def __init__(self, fn: Callable, transform: Callable = jax.jit,
               cache_prefix: Optional[str] = None, **jit_kwargs):
    """`cache_prefix` (program_cache.experiment_key): store and reuse the compiled programs
    across runs; only for jax.jit steps."""
    self._transform = transform
    self._cache_prefix = cache_prefix if transform is jax.jit else None
    self._jit_kwargs = jit_kwargs
    self.jitted = transform(fn, **jit_kwargs)
    self.compiled: dict[int, Any] = {}  # batch width -> compiled program

  def __call__(self, *args):
    return self.compiled.get(_width(args[-1]), self.jitted)(*args)

  def pending(self, host_batches: Sequence[dict], to_device: Callable, fixed_args: tuple
              ) -> list[tuple["WidthPrograms", int, Callable, Optional[str]]]:
    """(self, width, () -> the step lowered for that width, its program-cache key or None) for
    each width of `host_batches` without a program yet; one batch per width goes to the
    devices. The step is traced on the first call, so that the caller can compile one step's
    programs while tracing the next (and never, for widths whose program is cached)."""
    by_width = {}
    for host_batch in host_batches:
      width = _width(host_batch)
      if width not in self.compiled and width not in by_width:
        by_width[width] = to_device(host_batch)
    lowering = functools.cache(lambda: self.lowering(fixed_args, list(by_width.values())))
    key = lambda batch: (None if self._cache_prefix is None else
                         program_cache.program_key(self._cache_prefix, (fixed_args, batch)))
    return [(self, width, lambda batch=batch: lowering()(batch), key(batch))
            for width, batch in by_width.items()]

  def lowering(self, fixed_args: tuple, batches: list[dict]) -> Callable:
    """batch -> the step lowered for its shape. With several widths, the step is traced once
    with a symbolic width (jax.export) and each width only specialises that trace: tracing the
    model costs ~1 s of Python per shape (the train step; the eval step ~0.7 s), the
    specialisation ~0.1 s. Falls back to tracing each shape where that does not apply (one
    width, several processes, a model whose code needs a constant width)."""
    per_shape = lambda batch: self.jitted.lower(*fixed_args, batch)
    if len(batches) < 2 or jax.process_count() > 1 or self._transform is not jax.jit:
      return per_shape
    try:
      exported = export_over_width(self.jitted, fixed_args, batches)
    except Exception:  # noqa: BLE001 - any failure only costs the faster path
      return per_shape
    call = jax.jit(exported.call, **self._jit_kwargs)
    return lambda batch: call.lower(*fixed_args, batch)


def export_over_width(jitted, fixed_args: tuple, batches: list[dict]):
  """`jitted(*fixed_args, batch)` exported (jax.export) with the batch width symbolic: the
  dimension 1 of every batch array whose size differs between `batches`."""
  from jax import export
  (width,) = export.symbolic_shape("width")
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

  def symbolic(name, x):
    if len({b[name].shape for b in batches}) == 1:
      return abstract(x)
    return jax.ShapeDtypeStruct((x.shape[0], width, *x.shape[2:]), x.dtype, sharding=x.sharding)

  batch = {name: symbolic(name, x) for name, x in batches[0].items()}
  # jaxft's own kernels (jaxft.native) are custom calls that export refuses by default: the
  # exported program is only ever run here, in this process.
  ours = [export.DisabledSafetyCheck.custom_call(t) for t in native.registered_targets()]
  return export.export(jitted, disabled_checks=ours)(
      *jax.tree_util.tree_map(abstract, fixed_args), batch)


def _on_mesh(host_tree, shardings):
  return jax.tree_util.tree_map(jax.make_array_from_process_local_data, shardings, host_tree)


def task_metrics(task: tasks.Task, outputs: dict, data: Encoded) -> dict:
  """Metrics from the per-example eval outputs and the gold labels in `data`."""
  if task.kind == "mlm":
    count = float(np.sum(outputs["count"]))
    loss = float(np.sum(outputs["nll"])) / max(count, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": float(np.sum(outputs["correct"])) / max(count, 1.0)}
  if task.kind == "token_classification":
    return token_metrics(task, outputs["logits"], data)
  logits = np.stack(outputs["logits"])
  predictions = task.predictions(logits)
  if task.kind == "regression":
    result = metrics_lib.regression_metrics(data.labels, predictions)
    result["loss"] = result["mse"]
  elif task.kind == "multilabel":
    result = metrics_lib.multilabel_metrics(data.labels.astype(np.int32), predictions)
    p = np.clip(tasks.sigmoid(logits), 1e-7, 1 - 1e-7)
    result["loss"] = float(-np.mean(data.labels * np.log(p) + (1 - data.labels) * np.log(1 - p)))
  else:
    result = metrics_lib.classification_metrics(data.labels, predictions, len(task.label_names))
    log_probs = tasks.log_softmax(logits)
    result["loss"] = float(-log_probs[np.arange(len(data)), data.labels].mean())
  return result


def token_metrics(task: tasks.Task, window_logits: list, data: Encoded) -> dict:
  """Entity scores over every word of every sentence (windows mapped back to words), and the
  token loss over scored positions."""
  log_probs = [tasks.log_softmax(x) for x in window_logits]
  nll = sum(-float(np.sum(lp[np.arange(len(lp)), y[:len(lp)]] * w[:len(lp)]))
            for lp, y, w in zip(log_probs, data.labels, data.label_weights))
  scored = sum(float(np.sum(w)) for w in data.label_weights)
  predicted_ids = data.words.sentence_predictions([x.argmax(-1) for x in window_logits])
  names = task.label_names
  predicted = [[names[i] for i in sentence] for sentence in predicted_ids]
  result = metrics_lib.entity_metrics(data.words.tags, predicted)
  result["loss"] = nll / max(scored, 1.0)
  return result


def _to_host(tree: dict) -> dict:
  if jax.process_count() > 1:
    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in tree.items()}
  return {k: np.asarray(v) for k, v in jax.device_get(tree).items()}


def build(config, label_names: Optional[Sequence[str]] = None, read_train: bool = True,
          devices: Optional[Sequence] = None) -> Experiment:
  """Loads tokenizer, training data (which fixes the label names), model and mesh for `config`.

  `devices` (default: all) lets a caller run on a subset, e.g. one device in a test.
  """
  config_lib.validate(config)
  config_lib.resolve_task_defaults(config)
  model_dir = models.resolve_model_dir(config.model.name_or_path)
  tokenizer = models.load_tokenizer(model_dir, config.model.trust_remote_code,
                                    words_given=config.task.kind == "token_classification")
  if config.data.label_names is not None:
    label_names = tuple(str(n) for n in config.data.label_names)
  train_data = None
  if read_train:
    train_data, label_names = read_split(config.data.train_file, config, tokenizer, label_names,
                                         config.data.max_train_examples)
  needs_labels = config.task.kind not in ("regression", "mlm")
  if needs_labels and not label_names:
    fail("the label names are unknown: set data.label_names or give a training file")
  task = tasks.make(config.task.kind, tuple(label_names or ()) if needs_labels else (),
                    config.task.threshold)
  mesh = parallel.make_mesh(dict(config.parallel.mesh), devices)
  whole_arrays = mesh.devices.size == 1 or config.parallel.mode == "pmap"
  model = models.load_model(model_dir, task, config.model.pooling, config.seed,
                            config.train.compute_dtype, config.model.trust_remote_code,
                            attention.implementation(config.model.attention,
                                                     whole_arrays=whole_arrays))
  if task.kind == "regression" and train_data is not None:
    model = _start_at_the_mean(model, train_data.labels, config.peft.head_pattern)
  _check_model_fits(config, tokenizer, model)
  trainable, frozen = peft.split_params(model.params, peft.trainable_rules(config.peft),
                                        config.peft.method)
  logits = model.logits
  if config.peft.method == "lora":
    lora = peft.init_lora(frozen, config.peft.lora, config.peft.head_pattern, config.seed)
    trainable = {**trainable, peft.LORA_KEY: lora}
    logits = peft.with_lora(model.logits, peft.lora_scale(config.peft.lora),
                            config.peft.lora.dropout)
  parallel.check_batch_size("train.batch_size", config.train.batch_size // 
                            config.train.grad_accum_steps, mesh)
  parallel.check_batch_size("train.eval_batch_size", config.train.eval_batch_size, mesh)
  buckets = _bucket_lengths(config, train_data)
  return Experiment(config, model_dir, tokenizer, task, model, mesh, buckets, trainable, frozen,
                    logits, train_data)


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
  import re
  from flax import traverse_util
  flat = traverse_util.flatten_dict(model.params)
  for key, value in flat.items():
    if key[-1] == "bias" and value.shape == (1,) and re.fullmatch(head_pattern, peft.path_of(key)):
      flat[key] = np.full((1,), float(np.mean(targets)), np.float32)
  return dataclasses.replace(model, params=traverse_util.unflatten_dict(flat))


def _check_model_fits(config, tokenizer, model: models.Model) -> None:
  vocab = getattr(model.hf_config, "vocab_size", None)
  if vocab is not None and len(tokenizer) > vocab:
    fail(f"the tokenizer ({len(tokenizer)} tokens) does not match the model (vocabulary of "
         f"{vocab}); use the tokenizer saved with the model in {model.model_dir}")
  max_positions = getattr(model.hf_config, "max_position_embeddings", None)
  if max_positions is not None and config.data.max_seq_length > max_positions:
    fail(f"config data.max_seq_length={config.data.max_seq_length} exceeds the model's "
         f"max_position_embeddings={max_positions}; lower it")
