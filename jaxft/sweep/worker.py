"""A sweep worker: `python -m jaxft.sweep.worker` (started by jaxft-sweep, one per --workers,
with the same flags). It takes trials from the study one after another and runs each as an
ordinary jaxft run in DIR/trials/<n>/, in this process, so trials that differ only in run
values (jaxft.optim.RUN_VALUE_KEYS) reuse the programs the first one compiled.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # placed on its cores, then start-up, before JAX loads
  from jaxft.sweep import devices
  devices.stop_with_parent()
  devices.pin_this_worker()
  from jaxft import runtime
  runtime.start_process()

import shutil
import signal
import sys
import optuna

from jaxft import compiled, config as config_lib, runtime, train
from jaxft.checkpoint import Checkpoints, checkpoint_dir
from jaxft.errors import UserError, fail
from jaxft.metrics import read_metrics
from jaxft.report import best_record
from jaxft.sweep import flags as sweep_flags, space, study as study_lib

WORKER_INDEX = "JAXFT_SWEEP_WORKER"  # which of the sweep's workers this process is
# A worker stops after this many trials in a row failed before training started: the config or
# the data is wrong for every trial, not one trial's values.
MAX_SETUP_FAILURES = 3


def _remove_checkpoints(workdir: str, ckpt_config, keep_best: bool) -> None:
  """Removes the trial's checkpoints: all of them, or all but the best (its run's own choice,
  which evaluate and predict load as `best`)."""
  folder = checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return
  keep = None
  if keep_best:
    ckpts = Checkpoints(workdir, ckpt_config, read_only=True)
    keep = ckpts.best_step()
    ckpts.close()
  for name in os.listdir(folder):
    if keep is None or name != str(keep):
      shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def run_trial(trial: optuna.trial.Trial, values: dict, base_config, sweep, directory: str,
              metric: str, mode: str) -> None:
  """Trains trial `trial` with `values` in DIR/trials/<n>/, reporting each evaluation to the
  pruner, and tells the study how it ended. A UserError (bad values for this trial, a loss
  that diverged) fails the trial and is raised again."""
  workdir = study_lib.trial_dir(directory, trial.number)
  config = space.trial_config(base_config, sweep, values)
  # A trial that continues an interrupted one reports that one's evaluations again.
  for index, record in enumerate(read_metrics(workdir, "validation"), start=1):
    if isinstance(record.get(metric), (int, float)):
      trial.report(record[metric], index)
  pruned = [False]

  def on_evaluation(step: int, num_steps: int, metrics: dict) -> bool:
    index = len(read_metrics(workdir, "validation"))  # this evaluation's, logged just now
    trial.report(float(metrics[metric]), index)
    # The last evaluation is the result: stopping there would save nothing.
    pruned[0] = step < num_steps and trial.should_prune()
    return pruned[0]

  print(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in values.items()),
        flush=True)
  compiled.CompileStats.reset()  # each trial's metrics count its own compilations
  with study_lib.Heartbeat(os.path.join(workdir, study_lib.HEARTBEAT)):
    try:
      train.train_and_evaluate(config, workdir, on_evaluation=on_evaluation)
    except UserError as e:
      trial.set_user_attr("error", str(e))
      trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
      raise
  if pruned[0]:
    trial.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    if sweep.pruned_checkpoints == "remove":
      _remove_checkpoints(workdir, config.checkpoint, keep_best=False)
    return
  best = best_record(read_metrics(workdir), metric, mode)
  if best is None:
    fail(f"trial {trial.number} logged no {metric}; set data.validation_file so that trials "
         "can be compared")
  trial.study.tell(trial, best[metric])
  if sweep.completed_checkpoints == "best":
    _remove_checkpoints(workdir, config_lib.with_task_defaults(config).checkpoint,
                        keep_best=True)


def work(base_config, sweep, directory: str, wanted: int) -> None:
  """Runs trials until the sweep has `wanted` of them."""
  metric, mode = config_lib.selection(base_config.task.kind, base_config.checkpoint.best_metric,
                                      base_config.checkpoint.best_mode)
  index = int(os.environ.get(WORKER_INDEX, "0"))
  study = study_lib.open_study(directory, sweep, mode, seed=sweep.seed * 1000 + index)
  setup_failures = 0
  while True:
    claimed = study_lib.claim(study, sweep, wanted, directory)
    if claimed is None:
      return
    trial, values = claimed
    try:
      run_trial(trial, values, base_config, sweep, directory, metric, mode)
      setup_failures = 0
    except UserError as e:
      started = read_metrics(study_lib.trial_dir(directory, trial.number))
      print(f"trial {trial.number} failed: {e}", flush=True)
      setup_failures = 0 if started else setup_failures + 1
      if setup_failures >= MAX_SETUP_FAILURES:
        fail(f"{setup_failures} trials in a row failed before training; the last: {e}")


def _exit_on_signal(signum, frame) -> None:
  """Between trials a stop signal ends the worker at once; during one, the training loop's own
  handler saves the trial first (jaxft.train)."""
  del frame
  print(f"{signal.Signals(signum).name}: stopping", flush=True)
  sys.exit(train.PREEMPTED_EXIT)


def run() -> None:
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, _exit_on_signal)
  held = sweep_flags.define()
  runtime.run_main(lambda: work(*sweep_flags.loaded(held)), required=("workdir", "trials"))


if __name__ == "__main__":
  run()
