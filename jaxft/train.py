r"""Fine-tune a pretrained encoder: `python -m jaxft.train --config=configs/X.py --workdir=DIR`.

Re-running the same command on an existing DIR resumes from its latest checkpoint.
Overrides: `--config.train.learning_rate=1e-4 --config.data.train_file=PATH ...`.

The life of a run, top to bottom in `train_and_evaluate`: workdir checks, data and model, steps and
schedule, state (fresh or restored), the loop (log, evaluate, checkpoint, stop early), the end.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m jaxft.train`: start-up comes before JAX loads
  from jaxft import runtime
  runtime.start_process()

import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxft import (__version__, compiled, config as config_lib, distill, experiment, fewshot,
                   inference, models, optim, parallel, runtime, storage)
from jaxft.checkpoint import Checkpoints, checkpoint_dir
from jaxft.data import batching
from jaxft.errors import fail
from jaxft.metrics import MetricWriter, read_metrics, scalars

# Config keys a resumed run must share with the run that wrote the workdir's checkpoints.
_RESUME_KEYS = ("task.kind", "model.name_or_path", "model.pooling", "data.text_fields",
                "data.label_field", "train.batch_size", "seed", "peft.method",
                "peft.trainable_rules", "peft.lora.rank", "peft.lora.targets",
                "peft.lora.use_dora", "peft.ia3.targets", "peft.ia3.feedforward",
                "peft.adapter.kind", "peft.adapter.reduction_factor",
                "peft.prompt.num_virtual_tokens", "peft.prefix.num_virtual_tokens",
                "peft.prefix.projection_dim",
                "data.packing", "data.packing_length", "data.packing_rows")


def _lookup(c, dotted: str):
  for part in dotted.split("."):
    c = c[part]
  return tuple(c) if isinstance(c, (list, tuple)) else c


def _prepare_workdir(workdir: str) -> None:
  try:
    storage.makedirs(workdir)
    # One probe per process: on shared storage several hosts run this at once.
    probe = storage.join(workdir, f".jaxft-write-test-{socket.gethostname()}-{os.getpid()}")
    storage.write_text(probe, "ok")
    storage.remove(probe)
  except OSError as e:
    fail(f"workdir {workdir} is not writable ({e.strerror or e}); choose another --workdir")


# Keys whose unset value ("auto", None, 0) the run decides at start, from the platform or the
# mesh: a run resumed elsewhere keeps what config.json recorded, so it goes on training the
# same model on the same batches.
_PLATFORM_CHOICES = {"train.compute_dtype": "auto", "model.attention_dropout": None,
                     "data.packing": "auto", "data.packing_groups": 0}


def _saved_config(workdir: str):
  """The resolved config the run in `workdir` recorded, or None."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    return None
  return config_lib.from_json(storage.read_text(path))


def _with_recorded_platform_choices(config, saved):
  """`config` with the platform's choices of the run being resumed, where it leaves them open."""
  if saved is None:
    return config
  values = {key: _lookup(saved, key) for key, unset in _PLATFORM_CHOICES.items()
            if _lookup(config, key) == unset}
  return config_lib.replace(config, values)


def _check_resume_compatible(workdir: str, config, exp, ckpts: Checkpoints) -> None:
  """A workdir holding another run's checkpoints must not be silently continued or overwritten."""
  saved = _saved_config(workdir)
  if not ckpts.steps() or saved is None:
    return
  for key in _RESUME_KEYS:
    if _lookup(saved, key) != _lookup(config, key):
      fail(f"{workdir} holds checkpoints of a run with {key}={_lookup(saved, key)!r}, not "
           f"{_lookup(config, key)!r}; use a new --workdir (or the same config to resume)")
  if tuple(saved.data.label_names or ()) != exp.label_names:
    fail(f"{workdir} holds checkpoints trained on labels {list(saved.data.label_names)}, this "
         f"data has {list(exp.label_names)}; use a new --workdir")


def _write_run_files(workdir: str, config, exp, fingerprint: str, num_steps: int) -> None:
  if jax.process_index() != 0:
    return
  storage.write_text(storage.join(workdir, "config.json"), config_lib.to_json(config))
  info = {"jaxft_version": __version__, "model_dir": exp.model_dir,
          "model_fingerprint": fingerprint, "task": config.task.kind,
          "label_names": list(exp.label_names), "best_metric": config.checkpoint.best_metric,
          "best_mode": config.checkpoint.best_mode,
          "params": exp.param_counts(), "peft_method": config.peft.method,
          "num_train_steps": num_steps,
          "train_examples": len(exp.train_data or ()), "devices": jax.device_count(),
          "processes": jax.process_count(), "mesh": dict(exp.mesh.shape),
          "bucket_lengths": list(exp.buckets), "attention": exp.model.attention,
          "packing": exp.packing, "train_method": config.train.method}
  if exp.few_shot_indices is not None:  # data.examples_per_class: which rows of the file
    info["few_shot_examples"] = [int(i) for i in exp.few_shot_indices]
  storage.write_text(storage.join(workdir, "run.json"), json.dumps(info, indent=2))


def _prefetch(items: Iterator, size: int = 2) -> Iterator:
  """Runs `items` in a background thread, `size` ahead, so input never stalls the step."""
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in items:
        q.put(item)
      q.put(done)
    except BaseException as e:  # re-raised in the consumer
      q.put(e)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


def _timed(items: Iterator, waited: list) -> Iterator:
  """Yields from `items`, adding the seconds spent waiting for each item to waited[0]."""
  while True:
    start = time.perf_counter()
    try:
      item = next(items)
    except StopIteration:
      return
    waited[0] += time.perf_counter() - start
    yield item


def _host_train_batch(exp, data, steps, step: int) -> dict:
  """This process's share of training step `step`'s batch (jaxft.data.order, or the
  contrastive run's jaxft.fewshot.PairSteps)."""
  if isinstance(steps, fewshot.PairSteps):
    return steps.host_batch(exp, data, step)
  chosen, shape = steps.step(step)
  epoch, _ = steps.locate(step)
  if shape is None:
    return exp.host_batch(data, chosen, exp.config.train.batch_size, epoch)
  return exp.host_packed_batch(data, chosen, shape, epoch)


def _train_batches(exp, train_step, data, steps, start_step: int, num_steps: int) -> Iterator:
  """(step, padded tokens of the global batch, device batch) from `start_step` on; batch =
  f(seed, epoch, index)."""
  for step in range(start_step, num_steps):
    host = _host_train_batch(exp, data, steps, step)
    yield step, host["input_ids"].size * jax.process_count(), train_step.device_batch(host)


def _first_batches_of_each_shape(exp, data, steps) -> list[dict]:
  """One host batch of every shape training can take: what to compile before step 1."""
  if isinstance(steps, fewshot.PairSteps):
    return steps.first_batches(exp, data)
  if exp.packing == "off":
    return [exp.host_batch(data, [int(i)], exp.config.train.batch_size)
            for i in batching.first_of_each_width(data.lengths, exp.buckets)]
  empty = lambda shape: [[] for _ in range(shape.groups)]
  return [exp.host_packed_batch(data, empty(shape), shape) for shape in steps.shapes()]


class _Progress:
  """Console progress (process 0 only): a tqdm bar with loss and throughput."""

  def __init__(self, start: int, total: int):
    self.bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, desc="train", unit="step", mininterval=1.0,
                      dynamic_ncols=True)

  def update(self, **postfix) -> None:
    if self.bar is not None:
      self.bar.update(1)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def write(self, line: str) -> None:
    if self.bar is not None:
      self.bar.write(line)
    elif jax.process_index() == 0:
      print(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after saving; run the command again


class _PreemptionWatch:
  """Notes SIGTERM/SIGINT instead of dying, so the loop can save the current step first.

  One process: a Python handler notes the signal and the loop saves at the next step.
  Several processes: they must agree on the step, which JAX's preemption sync does (orbax
  `reached_preemption`). Its notifier listens for SIGTERM itself, so SIGTERM is left to it (a
  Python handler would replace it and the signal would never reach the sync), and SIGINT is
  passed on to it as SIGTERM.
  """

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous = {}
    self._several = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._several else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._note)

  def _note(self, signum, frame) -> None:
    del frame
    self.signal = signum
    if self._several:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

  def requested(self, ckpts: Checkpoints, step: int) -> bool:
    if self._several:
      return ckpts.reached_preemption(step)
    return self.signal is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_finite(pending: list, policy: str) -> int:
  """The number of non-finite steps among `pending` [(step, _, metrics)]; an error under "stop"."""
  flags = jax.device_get([m["finite"] for _, _, m in pending])
  bad = [step for (step, _, _), ok in zip(pending, flags) if not ok]
  if bad and policy == "stop":
    fail(f"the loss or gradient is not finite at step {bad[0]}; training stopped and the last "
         "good checkpoint is kept (that step changed nothing). Lower train.learning_rate, "
         "check the data, or set train.nonfinite=skip to skip such steps")
  return len(bad)


def _summarise(pending: list, seconds: float, input_wait: float) -> dict:
  """Averages the device metrics of the steps since the last log (one device-to-host pull).

  pending: (step, padded tokens of the batch, device metrics) per step. `padding_fraction` is
  the share of the computed token positions that were padding; `input_wait_fraction` the share
  of the interval the loop spent waiting for its next batch (an upper bound on input stalls).
  """
  host = jax.device_get([m for _, _, m in pending])
  examples = sum(float(m["examples"]) for m in host)
  tokens = sum(float(m["tokens"]) for m in host)
  padded = sum(p for _, p, _ in pending)
  return {
      "loss": sum(float(m["loss"]) * float(m["examples"]) for m in host) / max(examples, 1.0),
      "grad_norm": float(np.mean([float(m["grad_norm"]) for m in host])),
      "learning_rate": float(host[-1]["learning_rate"]),
      "examples_per_sec": examples / seconds, "tokens_per_sec": tokens / seconds,
      "padding_fraction": 1.0 - tokens / max(padded, 1.0),
      "input_wait_fraction": min(1.0, input_wait / seconds),
  }


def evaluation_steps(train_config, num_steps: int, steps_per_epoch: int) -> Callable[[int], bool]:
  """step -> whether training evaluates after it: `num_evaluations` times spread evenly over
  the run, else every `eval_every` steps (else every epoch) and at the end."""
  t = train_config
  if t.num_evaluations:
    n = t.num_evaluations
    return {-(-k * num_steps // n) for k in range(1, n + 1)}.__contains__
  every = t.eval_every or steps_per_epoch
  return lambda step: step % every == 0 or step == num_steps


def _is_better(value: float, best: Optional[float], mode: str) -> bool:
  return best is None or (value > best if mode == "max" else value < best)


EvaluationHook = Callable[[int, int, dict], bool]


def train_and_evaluate(config, workdir: str, devices=None, platform: Optional[str] = None,
                       on_evaluation: Optional[EvaluationHook] = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final validation metrics.

  `devices` (default: all) restricts the run to some devices, e.g. one device in a test;
  `platform` (default: JAX's backend) picks the platform defaults (jaxft.experiment.build).
  `on_evaluation(step, num_steps, metrics)` is called after each evaluation is logged; True
  stops the run there, its checkpoint saved (a sweep's pruner, jaxft.sweep).
  """
  parallel.initialize_distributed(config.parallel.distributed)
  runtime.configure_jax()
  _prepare_workdir(workdir)
  parallel.check_shared_directory(storage.join(workdir, "checkpoints"))

  # ---- data and model ----------------------------------------------------------------------
  config = _with_recorded_platform_choices(config, _saved_config(workdir))
  exp = experiment.build(config, devices=devices, platform=platform,
                         read_train=config.data.train_file is not None)
  config = exp.config  # resolved: what config.json records and the rest of the run uses
  t, k = config.train, config.checkpoint
  train_data = exp.train_data
  val_data = exp.load_split("validation") if config.data.validation_file else None

  # ---- steps, schedule, optimizer ------------------------------------------------------------
  contrastive = t.method == "contrastive"
  if contrastive:  # SetFit's method (jaxft.fewshot): pairs of the training examples
    steps = fewshot.PairSteps(train_data, t, config.seed, exp.packing != "off",
                              config.data.packing_groups)
  elif t.method == "zero_shot":  # the description head as it is: no step
    steps = fewshot.NO_STEPS
  else:
    steps = exp.train_order(train_data)
  spe = steps.steps_per_epoch
  num_steps = 0 if steps is fewshot.NO_STEPS else (t.num_train_steps or
                                                   steps.num_steps(t.num_epochs))
  evaluates_after = evaluation_steps(t, num_steps, spe)
  # Saves every save_every steps, else where training evaluates (also without validation data).
  saves_after = (lambda step: step % k.save_every == 0) if k.save_every else evaluates_after
  tx, learning_rate = exp.optimizer(num_steps)
  abstract = exp.abstract_state(tx)

  # ---- state: restored or fresh ----------------------------------------------------------------
  ckpts = Checkpoints(workdir, k)
  _check_resume_compatible(workdir, config, exp, ckpts)
  fingerprint = models.fingerprint(exp.model_dir)
  counts = exp.param_counts()
  progress_log = [f"parameters: {counts['trainable']:,} trainable of {counts['total']:,} "
                  f"({100 * counts['trainable'] / counts['total']:.2f}%), "
                  f"peft.method={config.peft.method}"]
  latest, state, meta, damaged = ckpts.restore_latest_good(abstract)
  progress_log.extend(damaged)
  if latest is not None:
    if meta["base_model"]["fingerprint"] != fingerprint:
      fail(f"the checkpoints in {workdir} were trained from a different base model "
           f"(fingerprint {meta['base_model']['fingerprint']}, now {fingerprint}); use a new "
           "--workdir or the original model")
    progress_log.append(f"resumed from step {latest} of {checkpoint_dir(workdir)}")
    state = optim.set_run_values(state, optim.run_values(t, num_steps))
  else:
    state = exp.init_state(tx)
    # (a contrastive run fits its head where it evaluates: no need to start one)
    if config.data.label_descriptions is not None and not contrastive:
      state = {**state, "params": fewshot.with_description_head(exp, state["params"])}
  start = int(jax.device_get(state["step"]))
  _write_run_files(workdir, config, exp, fingerprint, num_steps)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.truncate_after(start)

  # Early stopping and best tracking continue from the evaluations already logged.
  best, evals_since_best = None, 0
  for record in read_metrics(workdir, "validation"):
    value = record.get(k.best_metric)
    if value is None:
      continue
    if _is_better(value, best, k.best_mode):
      best, evals_since_best = value, 0
    else:
      evals_since_best += 1

  teacher = distill.load_teacher(exp) if t.distill.teacher else None
  objective = (exp.embeddings, fewshot.cosine_similarity_loss) if contrastive else None
  train_step = compiled.train_step(
      exp, tx, learning_rate, abstract, exp.program_cache_key("train"), teacher, objective)
  state = train_step.place(state)
  predictor = inference.Predictor(exp)
  # The contrastive run's head is fitted to its encoder where it is evaluated and saved (both
  # read the loop's current state).
  head = fewshot.HeadFitter(exp, train_data) if contrastive else None
  eval_params = lambda step: (head.params(train_step.params(state), step) if head
                              else train_step.params(state))
  savable = lambda step: (head.state(train_step.savable(state), step) if head
                          else train_step.savable(state))
  frozen = exp.frozen()
  if start < num_steps:
    train_step.precompile(
        state, frozen, _first_batches_of_each_shape(exp, train_data, steps),
        predictor.programs,
        [] if val_data is None else predictor.first_batch_of_each_width(val_data))

  def meta_for(step: int, eval_metrics: Optional[dict]) -> dict:
    epoch, index = steps.locate(step)
    return {"step": step, "epoch": epoch, "batch_in_epoch": index,
            "steps_per_epoch": steps.steps_in_epoch(epoch),
            "metrics": eval_metrics, "label_names": list(exp.label_names),
            "base_model": {"name_or_path": config.model.name_or_path,
                           "fingerprint": fingerprint}}

  # ---- the loop ----------------------------------------------------------------------------------
  progress = _Progress(start, num_steps)
  for line in progress_log:
    progress.write(line)
  pending, last_log, shapes_seen = [], time.perf_counter(), set()
  input_wait = [0.0]  # seconds the loop waited for batches since the last log
  eval_metrics: Optional[dict] = None
  done, stopped_early = start, False
  preemption = _PreemptionWatch()
  try:
    for step, padded, batch in _timed(_prefetch(
        _train_batches(exp, train_step, train_data, steps, start, num_steps)), input_wait):
      state, step_metrics = train_step(state, frozen, batch)
      done = step + 1
      pending.append((done, padded, step_metrics))
      shapes_seen.add(batch["input_ids"].shape)

      preempted = preemption.requested(ckpts, done)
      log_now = done % t.log_every == 0 or done == num_steps or preempted
      eval_now = val_data is not None and evaluates_after(done)
      save_now = saves_after(done) or done == num_steps or eval_now
      if log_now or eval_now or save_now:
        skipped = _check_finite(pending, t.nonfinite)  # before anything is logged, evaluated, saved
      if log_now:
        now = time.perf_counter()
        summary = _summarise(pending, now - last_log, input_wait[0])
        summary["skipped_steps"] = skipped
        summary["batch_shapes"] = len(shapes_seen)  # distinct batch shapes so far
        summary.update(compiled.CompileStats.snapshot())  # cumulative, this process
        summary["trainable_params"] = counts["trainable"]
        summary["total_params"] = counts["total"]
        pending, last_log, input_wait[0] = [], now, 0.0
        writer.write(done, "train", summary)
        progress.update(loss=f"{summary['loss']:.4f}",
                        ex_s=f"{summary['examples_per_sec']:.1f}")
      else:
        progress.update()

      if preempted:  # save this step (its metrics are logged above) and leave
        ckpts.save(done, savable(done), meta_for(done, None))
        ckpts.close()  # waits for every pending save
        name = signal.Signals(preemption.signal).name if preemption.signal else "preemption"
        progress.write(f"{name}: saved a checkpoint at step {done} in "
                       f"{checkpoint_dir(workdir)}; run the same command again to resume")
        progress.close()
        sys.exit(PREEMPTED_EXIT)

      evaluated = None
      if eval_now:
        eval_start = time.perf_counter()
        evaluated = predictor.evaluate(eval_params(done), val_data)
        evaluated["eval_seconds"] = time.perf_counter() - eval_start
        eval_metrics = evaluated
        writer.write(done, "validation", evaluated)
        progress.write(f"step {done}: validation " + ", ".join(
            f"{name}={value:.4f}" for name, value in scalars(evaluated).items()))
        if _is_better(evaluated[k.best_metric], best, k.best_mode):
          best, evals_since_best = evaluated[k.best_metric], 0
        else:
          evals_since_best += 1
        last_log, input_wait[0] = time.perf_counter(), 0.0  # not training throughput

      stop = bool(t.early_stopping_patience and evaluated is not None
                  and evals_since_best >= t.early_stopping_patience)
      told_to_stop = bool(evaluated is not None and on_evaluation is not None
                          and on_evaluation(done, num_steps, evaluated))
      if save_now:  # a stop, early or told, follows an evaluation, which always saves
        ckpts.save(done, savable(done), meta_for(done, evaluated),
                   metrics=None if evaluated is None else scalars(evaluated))
      if stop:
        progress.write(f"early stopping at step {done}: {k.best_metric} has not improved for "
                       f"{evals_since_best} evaluations (best {best:.4f})")
      elif told_to_stop:
        progress.write(f"stopped at step {done} by the caller (e.g. a sweep's pruner)")
      if stop or told_to_stop:
        stopped_early = True
        break
    if num_steps == 0 and latest is None:  # train.method=zero_shot: the description head
      evaluated = None if val_data is None else predictor.evaluate(eval_params(0), val_data)
      if evaluated is not None:
        eval_metrics = evaluated
        writer.write(0, "validation", evaluated)
        best = evaluated[k.best_metric]
        progress.write("zero-shot validation " + ", ".join(
            f"{name}={value:.4f}" for name, value in scalars(evaluated).items()))
      ckpts.save(0, savable(0), meta_for(0, evaluated),
                 metrics=None if evaluated is None else scalars(evaluated))
  finally:
    preemption.restore()
    progress.close()  # ends the bar's line, so an error below starts on a line of its own
    ckpts.wait()  # also on errors: a save in flight must complete, never be cut off
  best_step = ckpts.best_step()  # every process: orbax calls may synchronise the hosts
  ckpts.close()
  writer.close()
  if jax.process_index() == 0:
    print(f"done: step {done if stopped_early else num_steps}, best checkpoint step "
          f"{best_step} ({k.best_metric}={best})", flush=True)
    stats = compiled.CompileStats
    print(f"compiled {stats.programs} programs in {stats.seconds:.1f} s "
          f"({stats.cache_hits} loaded from the compilation cache)", flush=True)
  return eval_metrics or {}


def run() -> None:
  """Console script `jaxft-train`. Flags are defined here, not at import, so that the library
  modules (train, evaluate, ...) can be imported together."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/*.py) returning a ConfigDict; override keys with "
      "--config.<key>=<value>.", lock_config=True)
  workdir_flag = flags.DEFINE_string(
      "workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/, config.json. An "
      "existing one is resumed.")
  runtime.run_main(lambda: train_and_evaluate(runtime.loaded_config(config_flag),
                                              workdir_flag.value), required=("workdir",))

if __name__ == "__main__":
  run()
