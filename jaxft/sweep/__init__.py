r"""Hyperparameter search on Optuna:

  jaxft-sweep --config=configs/sst2_minilm.py --sweep=configs/sweeps/sst2_lr_bs.py \
    --workdir=DIR --trials=12 --workers=2

Each trial is an ordinary jaxft run in DIR/trials/<n>/ (config.json, metrics.jsonl,
checkpoints) that jaxft-eval and jaxft-predict use as usual. Re-running the command resumes the
sweep: finished trials stay, an interrupted one continues from its checkpoint, the rest run.

- space.py: the sweep file's keys and distributions, checked against the config;
- study.py: the Optuna study (journal file in DIR), sampler, pruner, handing out trials;
- worker.py: a worker process running trials, reporting evaluations to the pruner;
- devices.py: each worker's share of the host's cores or GPUs;
- this module: the command, which starts the workers, follows them and writes the summary.

DIR holds sweep.json (what the sweep searches, checked on resume), study.journal,
workers/<i>.log (each worker's output), trials/<n>/ and, at the end, best_config.py: a config
file of the best trial, ready for `jaxft-train --config=DIR/best_config.py`.
"""

from __future__ import annotations

import json
import os
import pprint
import signal
import subprocess
import sys
import time
from typing import Optional

from jaxft import config as config_lib, runtime
from jaxft.errors import fail

RECORD = "sweep.json"
BEST_CONFIG = "best_config.py"
# What a resumed sweep must share with the one that started DIR: else its trials would not be
# comparable (sampler, pruner and seed may change).
_RECORDED = ("config_file", "config_overrides", "metric", "mode", "params", "fixed",
             "evaluations")
INTERRUPTED_EXIT = 75  # as jaxft-train: run the same command again to resume


def _record(held, sweep, metric: str, mode: str) -> dict:
  from jaxft.sweep import flags as sweep_flags, space
  return json.loads(json.dumps({
      "config_file": sweep_flags.config_file(held),
      "config_overrides": sweep_flags.config_overrides(held),
      "metric": metric, "mode": mode, "params": space.describe(sweep.params),
      "fixed": [list(pair) for pair in sweep.fixed], "evaluations": sweep.evaluations,
      "sampler": sweep.sampler, "pruner": sweep.pruner}, default=list))


def _check_or_write_record(directory: str, record: dict) -> None:
  path = os.path.join(directory, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for key in _RECORDED:
      if saved.get(key) != record[key]:
        fail(f"{directory} holds a sweep with {key}={saved.get(key)!r}, not {record[key]!r}; "
             "use a new --workdir, or the same command to resume it")
  with open(path, "w") as f:
    json.dump(record, f, indent=2)


# ---- the workers ---------------------------------------------------------------------------
def _last_line(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  except OSError:
    return ""
  errors = [line for line in lines if line.startswith("jaxft: error:")]
  return (errors or lines or [""])[-1]


def _start_workers(directory: str, workers: int) -> list[tuple[subprocess.Popen, str]]:
  from jaxft.sweep import devices, worker
  os.makedirs(os.path.join(directory, "workers"), exist_ok=True)
  flags_given = sys.argv[1:]  # the command's own arguments, whatever started it
  started = []
  for index, env in enumerate(devices.worker_environments(workers)):
    env[worker.WORKER_INDEX] = str(index)
    log = os.path.join(directory, "workers", f"{index}.log")
    with open(log, "a") as out:
      # In the command's process group: Ctrl-C and a job scheduler's kill reach the workers
      # too (each saves its trial and stops), and a worker stops when the command dies.
      process = subprocess.Popen([sys.executable, "-m", "jaxft.sweep.worker", *flags_given],
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
    started.append((process, log))
  return started


def _follow(study, started: list, metric: str) -> list[int]:
  """Waits for the workers, printing each trial as it finishes; SIGINT/SIGTERM are passed on
  (each worker saves its trial's checkpoint and stops). Returns the exit codes."""
  import optuna
  shown = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
  stop = []

  def pass_on(signum, frame):
    del frame
    stop.append(signum)

  previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    while True:
      running = [p for p, _ in started if p.poll() is None]
      if stop:  # again each second: a worker whose trial was ending took the last one for its run
        for process in running:
          process.send_signal(signal.SIGTERM)
      for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in shown:
          shown.add(t.number)
          if t.state != optuna.trial.TrialState.FAIL or "error" in t.user_attrs:
            print(_trial_line(t, metric), flush=True)
      if not running:
        break
      time.sleep(1.0)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if stop:
    print(f"{signal.Signals(stop[0]).name}: the workers saved their trials and stopped; run the "
          "same command again to resume the sweep", flush=True)
    sys.exit(INTERRUPTED_EXIT)
  return [p.returncode for p, _ in started]


def short(value) -> str:
  """A searched value as the summary and the report show it."""
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_line(t, metric: str) -> str:
  value = "" if t.value is None else f" {metric}={t.value:.4f}"
  params = ", ".join(f"{k}={short(v)}" for k, v in t.params.items())
  state = t.state.name.lower()
  extra = f" ({t.user_attrs['error']})" if "error" in t.user_attrs else ""
  return f"trial {t.number}: {state}{value} after {len(t.intermediate_values)} evaluations, " \
         f"{params}{extra}"


# ---- the summary ------------------------------------------------------------------------------
def best_config_text(record: dict, values: dict, number: int, metric: str, value: float) -> str:
  """A config file that rebuilds trial `number`: the sweep's config file with the command
  line's overrides, the sweep's fixed keys and the trial's values."""
  return f'''"""The best trial of a jaxft sweep: trial {number}, {metric}={value:.6f}.

  jaxft-train --config=THIS_FILE --workdir=DIR
"""

from jaxft import config as config_lib

BASE = {record["config_file"]!r}
VALUES = {pprint.pformat(values, indent=4)}


def get_config():
  return config_lib.replace(config_lib.load_config_file(BASE), VALUES)
'''


def summarize(study, directory: str, record: dict, sweep, overrides: dict) -> Optional[str]:
  """Prints the sweep's trials and writes best_config.py (the config file, `overrides` of the
  command line, the best trial's settings); returns its path (None without a finished
  trial)."""
  import optuna
  from jaxft.sweep import study as study_lib
  trials = study.get_trials(deepcopy=False)
  stopped = study_lib.interrupted(trials)
  states = ["interrupted" if t.number in stopped else t.state.name.lower() for t in trials]
  counts = {s: states.count(s) for s in dict.fromkeys(sorted(states))}
  print(f"sweep {directory}: {len(trials)} trials (" +
        ", ".join(f"{n} {name}" for name, n in counts.items()) + ")")
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  if not complete:
    return None
  best = study.best_trial
  baseline = [t for t in complete if t.user_attrs.get("baseline")]
  metric = record["metric"]
  print(f"best: {_trial_line(best, metric)}")
  if baseline:
    print(f"the config's own values: {_trial_line(baseline[0], metric)}")
  path = os.path.join(directory, BEST_CONFIG)
  from jaxft.sweep import space
  values = {**overrides, **space.trial_settings(sweep, best.params)}
  text = best_config_text(record, values, best.number, metric, best.value)
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {path}")
  return path


def sweep(held) -> None:
  from jaxft.sweep import flags as sweep_flags, space, study as study_lib
  config, s, directory, wanted = sweep_flags.loaded(held)
  metric, mode = config_lib.selection(config.task.kind, config.checkpoint.best_metric,
                                      config.checkpoint.best_mode)
  os.makedirs(directory, exist_ok=True)
  record = _record(held, s, metric, mode)
  _check_or_write_record(directory, record)
  study = study_lib.open_study(directory, s, mode, seed=s.seed)
  if s.baseline_first and s.sampler != "grid":  # a grid runs every point anyway
    with study_lib.locked(directory):
      study_lib.enqueue_baseline(study, space.baseline_values(config, s))
  workers = held["workers"].value
  print(f"sweep {directory}: {wanted} trials, {workers} worker(s) (logs in "
        f"{os.path.join(directory, 'workers')}), selecting by {metric} ({mode})", flush=True)
  started = _start_workers(directory, workers)
  codes = _follow(study, started, metric)
  summarize(study, directory, record, s, sweep_flags.config_overrides(held))
  failed = [(i, code) for i, code in enumerate(codes) if code != 0]
  if failed:
    index, code = failed[0]
    fail(f"worker {index} stopped with exit status {code}: "
         f"{_last_line(started[index][1])} (its log: {started[index][1]})")


def run() -> None:
  """Console script `jaxft-sweep`."""
  from jaxft.sweep import flags as sweep_flags
  held = sweep_flags.define()
  runtime.run_main(lambda: sweep(held), required=("workdir", "trials"))
