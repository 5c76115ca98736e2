"""Orbax checkpoints under DIR/checkpoints/: async saves, latest-N plus best-N, restore on any mesh.

Each checkpoint has two items:
  state  the train state {"step", "params", "opt_state", "rng"} (orbax StandardSave: tensorstore,
         no pickle), restored onto whatever shardings the caller's abstract state carries;
  meta   JSON: the data position, the evaluation metrics of that step, the label names and the
         base model's name and fingerprint.

Retention is a preservation policy (LatestN or BestN), not `max_to_keep` + `best_fn`, because
the latter deletes the latest checkpoint when it is not among the best, which breaks resume.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any, Optional, Union

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxft import storage
from jaxft.errors import UserError, fail


def checkpoint_dir(workdir: str) -> str:
  return storage.absolute(storage.join(workdir, "checkpoints"))


class Checkpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir: str, ckpt_config, *, read_only: bool = False):
    self.best_metric = ckpt_config.best_metric
    self.best_mode = ckpt_config.best_mode
    self._writing: Optional[int] = None  # the step of an async save that may be in flight
    drop_closed_loop_tracebacks()
    directory = checkpoint_dir(workdir)
    if storage.is_remote(directory):
      storage.configure_remote_files()  # before orbax opens the file system
    if read_only and not storage.isdir(directory):
      fail(f"{workdir} holds no checkpoints (no {directory}); train first with "
           f"`python -m jaxft.train --workdir={workdir} ...`")
    metric = self.best_metric

    def get_metric(m: dict) -> float:
      return float(m[metric])

    options = ocp.CheckpointManagerOptions(
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=bool(ckpt_config.async_save),
        best_fn=get_metric,
        best_mode=self.best_mode,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=ckpt_config.keep_latest),
            policies.BestN(get_metric_fn=get_metric, reverse=self.best_mode == "min",
                           n=ckpt_config.keep_best, keep_checkpoints_without_metrics=False),
        ]),
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # what a save cut short left behind
    )
    self._manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                          options=options)

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def resolve(self, which: Union[str, int]) -> int:
    """The step for "best", "latest" or a step number; a clear error when there is none."""
    steps = self.steps()
    if not steps:
      fail("no checkpoint has been saved in this workdir yet; train first")
    if which == "latest":
      return self.latest_step()
    if which == "best":
      best = self.best_step()
      return best if best is not None else self.latest_step()
    try:
      step = int(which)
    except ValueError:
      fail(f"--checkpoint={which!r} is not 'best', 'latest' or a step number")
    if step not in steps:
      fail(f"there is no checkpoint at step {step}; saved steps are {steps}")
    return step

  def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None) -> bool:
    """Starts an async save (returns at once). A step already saved is left as it is."""
    if step in self._manager.all_steps():
      return False
    if metrics is not None and self.best_metric not in metrics:
      fail(f"checkpoint.best_metric={self.best_metric!r} is not among the evaluation metrics "
           f"{sorted(metrics)}; set --config.checkpoint.best_metric to one of them")
    # Orbax first waits for the previous async save: an error raised here is most likely that
    # one's, so the message names the step being written.
    with self._storage_errors(self._writing if self._writing is not None else step):
      started = self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
    self._writing = step
    return started

  @contextlib.contextmanager
  def _storage_errors(self, step: Optional[int] = None):
    """A save that fails for want of space or permission is the user's to fix: one line.

    Orbax writes each checkpoint into a temporary folder and renames it only when complete, so
    the checkpoints saved before are intact and the run resumes from them once fixed.
    """
    try:
      yield
    except UserError:
      raise
    except Exception as e:
      reason = _storage_problem(e)
      if reason is None:
        raise
      _quiet_failed_save_threads()
      which = f"checkpoint step {step}" if step is not None else "a checkpoint"
      fail(f"saving {which} in {self._manager.directory} failed: {reason}; the checkpoints "
           "saved before are intact. Free disk space (or fix the folder's permissions) and run "
           "the same command again to resume")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except ValueError as e:
      if "do not match" not in str(e):
        raise
      fail(f"checkpoint step {step} in {self._manager.directory} does not fit this run's state "
           "(another config or jaxft version wrote it); use a new --workdir. "
           f"Detail: {' '.join(str(e).split())[:300]}")
    return restored["state"], restored["meta"]

  def restore_latest_good(self, abstract_state: Any) -> tuple[Optional[int], Any, Any, list]:
    """Restores the newest checkpoint that reads back whole, newest first.

    A checkpoint cut short (killed mid-write: orbax never finalised it) is not listed at all; one
    damaged later (truncated or missing files) fails to read and the previous one is used.
    Returns (step or None, state, meta, one line per damaged checkpoint skipped).
    """
    notes = []
    for step in sorted(self.steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta, notes
      except UserError:
        raise
      except Exception as e:  # tensorstore / JSON errors of a damaged checkpoint
        reason = " ".join(str(e).split())[:200]
        kept = self._set_aside(step)
        notes.append(f"checkpoint step {step} is damaged ({type(e).__name__}: {reason}); "
                     f"moved it to {kept} and using the previous one")
    if notes:
      fail(f"every checkpoint in {self._manager.directory} is damaged; move the folder away to "
           "start over. " + notes[-1])
    return None, None, None, notes

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step folder (kept for inspection, never deleted) so that orbax no longer
    lists it and the step can be saved again."""
    import time
    directory = str(self._manager.directory)
    source = storage.join(directory, str(step))
    target = storage.join(directory, f"damaged-{step}-{int(time.time())}")
    if jax.process_index() == 0 and storage.exists(source):
      storage.rename(source, target)
    self._manager.reload()
    return target

  def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
    """Restores only the parameters (evaluation, export): no optimizer state is read, so this
    works whatever optimizer wrote the checkpoint. Use it on a Checkpoints object of its own
    (orbax binds one handler per item and manager)."""
    item = {"params": abstract_params}
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True),
            meta=ocp.args.JsonRestore()))
    return restored["state"]["params"], restored["meta"]

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the step where JAX's preemption sync says to save (multi-host)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    with self._storage_errors(self._writing):
      self._manager.wait_until_finished()
    self._writing = None

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _is_closed_loop_noise(error: Optional[BaseException]) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def drop_closed_loop_tracebacks() -> None:
  """Silences exactly one kind of noise: when an async save fails, orbax closes the save's
  asyncio loop while tensorstore still completes writes from its native threads; each late
  completion calls into the closed loop and is printed as a "RuntimeError: Event loop is closed"
  traceback (native code reports it through sys.excepthook) *before* the failure reaches jaxft,
  which reports it in one line. Every other error still reaches the previous hooks."""
  import sys
  import threading
  if getattr(sys.excepthook, "drops_closed_loop_noise", False):
    return
  previous_excepthook, previous_thread_hook = sys.excepthook, threading.excepthook
  previous_unraisable = sys.unraisablehook

  def excepthook(kind, value, traceback):
    if not _is_closed_loop_noise(value):
      previous_excepthook(kind, value, traceback)

  def thread_hook(args):
    if not _is_closed_loop_noise(args.exc_value):
      previous_thread_hook(args)

  def unraisable_hook(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook.drops_closed_loop_noise = True
  sys.excepthook, threading.excepthook = excepthook, thread_hook
  sys.unraisablehook = unraisable_hook


def _quiet_failed_save_threads() -> None:
  """After a failed async save, orbax's background threads and asyncio loops fail again while
  the process exits and print tracebacks of the same failure; it is reported once, in one
  line, so their hooks and loggers are silenced."""
  import logging
  import sys
  import threading
  logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None


_STORAGE_PROBLEMS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                     errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _storage_problem(error: BaseException) -> Optional[str]:
  """The storage problem behind an error (orbax and tensorstore wrap OSErrors, sometimes only
  in the message), or None for anything else."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno in _STORAGE_PROBLEMS:
      return _STORAGE_PROBLEMS[seen.errno]
    text = str(seen).lower()
    for reason in _STORAGE_PROBLEMS.values():
      if reason in text:
        return reason
    seen = seen.__cause__ or seen.__context__
  return None
