"""The sweep's Optuna study: journal storage in the sweep's directory, sampler and pruner, and
handing out trials to workers, taking over those whose worker died.

Every worker process (on this host or another sharing the directory) opens the same study from
`study.journal` (Optuna's JournalStorage: a file, no database server). Trials are handed out
with ask-and-tell under a file lock, so W workers run exactly the trials asked for. A trial
whose worker is gone (killed, its host lost) is marked failed and asked again with the same
values; the new trial takes over its directory, so its jaxft run resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import threading
import time
from typing import Iterator, Optional

import optuna

from jaxft.sweep import space

STUDY_NAME = "jaxft"
JOURNAL = "study.journal"
LOCK = ".sweep.lock"
TRIALS = "trials"
HEARTBEAT = ".heartbeat"
HEARTBEAT_SECONDS = 10.0
# A trial of another host whose heartbeat is this old has lost its worker.
STALE_SECONDS = 120.0
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def trial_dir(directory: str, number: int) -> str:
  return os.path.join(directory, TRIALS, str(number))


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
  """The sweep's lock: one worker at a time hands out trials (fcntl, NFS included)."""
  with open(os.path.join(directory, LOCK), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _Grid(optuna.samplers.GridSampler):
  """Optuna's grid, without its end-of-grid `study.stop()`, which only works inside
  `study.optimize`: `claim` hands out no more trials than the grid has points."""

  def after_trial(self, study, trial, state, values) -> None:
    del study, trial, state, values


def sampler_for(sweep, seed: int) -> optuna.samplers.BaseSampler:
  if sweep.sampler == "grid":
    return _Grid(space.grid(sweep), seed=seed)
  if sweep.sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(n_startup_trials=sweep.startup_trials, seed=seed)


def pruner_for(sweep) -> optuna.pruners.BasePruner:
  """Trials report at evaluation 1, 2, ...; none is pruned at its first `warmup_evaluations`."""
  if sweep.pruner == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials,
                                       n_warmup_steps=sweep.warmup_evaluations + 1)
  if sweep.pruner == "successive_halving":
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, sweep.warmup_evaluations + 1),
        reduction_factor=sweep.reduction_factor)
  return optuna.pruners.NopPruner()


def _storage(directory: str) -> optuna.storages.JournalStorage:
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  path = os.path.join(directory, JOURNAL)
  return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
      path, lock_obj=optuna.storages.journal.JournalFileOpenLock(path)))


def load_study(directory: str) -> optuna.Study:
  """The sweep's study, to read (reports, benchmarks): no sampler or pruner of its own."""
  return optuna.load_study(study_name=STUDY_NAME, storage=_storage(directory))


def open_study(directory: str, sweep, direction: str, seed: int = 0) -> optuna.Study:
  """The sweep's study (created on first use). `seed` seeds this process's sampler: workers
  pass their own, or each would draw the same values."""
  return optuna.create_study(study_name=STUDY_NAME, storage=_storage(directory),
                             sampler=sampler_for(sweep, seed), pruner=pruner_for(sweep),
                             direction="maximize" if direction == "max" else "minimize",
                             load_if_exists=True)


# ---- who runs a trial --------------------------------------------------------------------
def _start_time(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (Linux), which tells a process from a
  later one that reused its pid; None where it cannot be read."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def this_worker() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def worker_gone(owner: dict, heartbeat: str, now: float) -> bool:
  """Whether the worker `owner` (this_worker() of the process that ran a trial) has stopped:
  on this host, its process is gone; elsewhere, its heartbeat file is older than STALE_SECONDS."""
  if owner.get("host") == socket.gethostname():
    started = _start_time(owner.get("pid", -1))
    return started is None or started != owner.get("started")
  try:
    return now - os.path.getmtime(heartbeat) > STALE_SECONDS
  except OSError:
    return True


class Heartbeat:
  """Touches a trial's heartbeat file every HEARTBEAT_SECONDS while the trial runs."""

  def __init__(self, path: str):
    self.path = path
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self) -> None:
    while True:
      with contextlib.suppress(OSError):
        with open(self.path, "a"):
          os.utime(self.path)
      if self._stop.wait(HEARTBEAT_SECONDS):
        return

  def __enter__(self) -> "Heartbeat":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def _take_over_stale_trials(study: optuna.Study, directory: str) -> list[int]:
  """Marks the running trials whose worker is gone as failed and asks each again with its
  values (the new trial continues its run, `claim`); returns their numbers."""
  now = time.time()
  taken = []
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    owner = t.user_attrs.get("worker")
    heartbeat = os.path.join(trial_dir(directory, t.number), HEARTBEAT)
    if owner is None or not worker_gone(owner, heartbeat, now):
      continue
    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(t.params, user_attrs={"continues": t.number,
                                              "baseline": t.user_attrs.get("baseline", False)})
    taken.append(t.number)
  return taken


def interrupted(trials) -> set[int]:
  """Numbers of the trials that lost their worker (another trial continues each)."""
  return {t.user_attrs["continues"] for t in trials if "continues" in t.user_attrs}


def counted(trials) -> int:
  """Trials that use up the sweep's budget: finished, running or waiting, and failed ones that
  were not interrupted (a run that diverged is a result; an interrupted one is asked again)."""
  stopped = interrupted(trials)
  return sum(1 for t in trials if t.number not in stopped)


def claim(study: optuna.Study, sweep, wanted: int, directory: str
          ) -> Optional[tuple[optuna.trial.Trial, dict]]:
  """The next trial for this worker and its {config key: value}, or None when the sweep has
  all `wanted` trials (or its whole grid). A trial that continues an interrupted one has its
  directory moved to its own."""
  with locked(directory):
    _take_over_stale_trials(study, directory)
    trials = study.get_trials(deepcopy=False)
    budget = min(wanted, space.grid_size(sweep)) if sweep.sampler == "grid" else wanted
    waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
    if counted(trials) >= budget and not waiting:
      return None
    trial = study.ask()
    trial.set_user_attr("worker", this_worker())
    values = space.suggest(trial, sweep.params)
    continues = trial.user_attrs.get("continues")
    own = trial_dir(directory, trial.number)
    if continues is not None and os.path.isdir(trial_dir(directory, continues)):
      shutil.move(trial_dir(directory, continues), own)
    os.makedirs(own, exist_ok=True)
  return trial, values


def enqueue_baseline(study: optuna.Study, values: dict) -> None:
  """The config's own values as the first trial, once per study."""
  if values and not study.get_trials(deepcopy=False):
    study.enqueue_trial(values, user_attrs={"baseline": True})
