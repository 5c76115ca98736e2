"""A sweep drawn on one page (`jaxft-report --workdir=SWEEP_DIR`): the selection metric per
trial, each trial's evaluations (where pruned ones stopped), the metric against each searched
value, and Optuna's parameter importances; report.md lists the trials."""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from jaxft import report as report_lib, storage
from jaxft.sweep import RECORD, short, study as study_lib

_STATE_STYLE = {"COMPLETE": ("o", "C0"), "PRUNED": ("x", "C3"), "FAIL": ("s", "C7"),
                "RUNNING": ("^", "C2"), "WAITING": (".", "C7")}


def is_sweep(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, RECORD))


def _load(directory: str):
  with open(os.path.join(directory, RECORD)) as f:
    record = json.load(f)
  study = study_lib.load_study(directory)
  return record, study, study.get_trials(deepcopy=False)


def _plot_trials(trials, metric: str, mode: str, path: str) -> None:
  plt = report_lib.pyplot()
  fig, ax = plt.subplots(figsize=(8, 4))
  for state, (marker, color) in _STATE_STYLE.items():
    chosen = [t for t in trials if t.state.name == state and t.value is not None]
    if chosen:
      ax.plot([t.number for t in chosen], [t.value for t in chosen], marker, color=color,
              linestyle="none", label=state.lower())
  complete = sorted((t.number, t.value) for t in trials
                    if t.state.name == "COMPLETE" and t.value is not None)
  if complete:
    best, running = [], None
    for _, value in complete:
      running = value if running is None else (max if mode == "max" else min)(running, value)
      best.append(running)
    ax.step([n for n, _ in complete], best, where="post", color="C0", alpha=0.5,
            label="best so far")
  ax.set_xlabel("trial")
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"{metric} per trial (pruned: at the evaluation where they stopped)")
  report_lib.save_figure(fig, path)


def _plot_evaluations(trials, metric: str, path: str) -> None:
  plt = report_lib.pyplot()
  fig, ax = plt.subplots(figsize=(8, 4))
  for t in trials:
    if not t.intermediate_values:
      continue
    steps = sorted(t.intermediate_values)
    style = "--" if t.state.name == "PRUNED" else "-"
    ax.plot(steps, [t.intermediate_values[s] for s in steps], style, marker=".",
            color="C3" if t.state.name == "PRUNED" else "C0", alpha=0.7)
  ax.set_xlabel("evaluation")
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.set_title("each trial's evaluations (dashed: pruned)")
  report_lib.save_figure(fig, path)


def _plot_slices(trials, record: dict, metric: str, path: str) -> bool:
  params = record["params"]
  finished = [t for t in trials if t.value is not None and t.params]
  if not finished or not params:
    return False
  plt = report_lib.pyplot()
  fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
  for ax, (key, distribution) in zip(axes[0], params):
    for state, (marker, color) in _STATE_STYLE.items():
      chosen = [t for t in finished if t.state.name == state and key in t.params]
      if chosen:
        xs = [t.params[key] for t in chosen]
        if distribution[0] == "categorical":  # each choice at its own position
          xs = [list(distribution[1]).index(x) for x in xs]
        ax.plot(xs, [t.value for t in chosen], marker, color=color, linestyle="none",
                label=state.lower())
    if distribution[0].startswith("log"):
      ax.set_xscale("log")
    if distribution[0] == "categorical":
      ax.set_xticks(range(len(distribution[1])), [str(c) for c in distribution[1]])
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  report_lib.save_figure(fig, path)
  return True


def _importances(study) -> Optional[dict]:
  """Optuna's parameter importances over the complete trials, where they can be had."""
  import optuna
  complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
  if len(complete) < 3:
    return None
  try:
    warnings.simplefilter("ignore")  # notes on how few trials there are
    return optuna.importance.get_param_importances(study)
  except (RuntimeError, ValueError):  # e.g. a parameter that never varied
    return None
  finally:
    warnings.resetwarnings()


def _plot_importances(importances: dict, path: str) -> None:
  plt = report_lib.pyplot()
  fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(importances)))
  names = list(importances)[::-1]
  ax.barh(names, [importances[n] for n in names], color="C0")
  ax.set_xlabel("importance (Optuna's default evaluator)")
  report_lib.save_figure(fig, path)


def _table(trials, params: list, metric: str) -> list[str]:
  keys = [key for key, _ in params]
  lines = [f"| trial | state | {metric} | evaluations | " + " | ".join(keys) + " |",
           "|" + "---|" * (4 + len(keys))]
  stopped = study_lib.interrupted(trials)
  for t in trials:
    value = "" if t.value is None else f"{t.value:.4f}"
    state = "interrupted" if t.number in stopped else t.state.name.lower()
    note = " (baseline)" if t.user_attrs.get("baseline") else ""
    if "continues" in t.user_attrs:
      note += f" (continues {t.user_attrs['continues']})"
    cells = [short(t.params.get(k, "")) for k in keys]
    lines.append(f"| {t.number}{note} | {state} | {value} | "
                 f"{len(t.intermediate_values)} | " + " | ".join(cells) + " |")
  return lines


def write_sweep_report(directory: str, out: Optional[str] = None) -> str:
  """Writes the sweep's plots and report.md into `out` (default DIR/report); returns the
  path of report.md."""
  record, study, trials = _load(directory)
  metric, mode = record["metric"], record["mode"]
  out = out or os.path.join(directory, "report")
  report_lib.prepare_output(out)
  lines = [f"# jaxft sweep: {directory}", "",
           f"{len(trials)} trials, selecting by {metric} ({mode}); sampler {record['sampler']}, "
           f"pruner {record['pruner']}.", ""]
  complete = [t for t in trials if t.state.name == "COMPLETE"]
  if complete:
    best = study.best_trial
    lines += [f"Best: trial {best.number}, {metric}={best.value:.4f}, " + ", ".join(
        f"{k}={short(v)}" for k, v in best.params.items()) + ".", ""]
  with storage.local_folder(out) as folder:
    figures = []
    if any(t.value is not None for t in trials):
      _plot_trials(trials, metric, mode, os.path.join(folder, "trials.png"))
      figures.append(("trials.png", f"{metric} of each trial, and the best so far."))
    if any(t.intermediate_values for t in trials):
      _plot_evaluations(trials, metric, os.path.join(folder, "evaluations.png"))
      figures.append(("evaluations.png", "The evaluations each trial reported to the pruner."))
    if _plot_slices(trials, record, metric, os.path.join(folder, "slices.png")):
      figures.append(("slices.png", f"{metric} against each searched value."))
    importances = _importances(study)
    if importances:
      _plot_importances(importances, os.path.join(folder, "importance.png"))
      figures.append(("importance.png", "How much each searched key mattered (Optuna's "
                                        "parameter importances over the complete trials)."))
    lines += ["## Trials", ""] + _table(trials, record["params"], metric) + [""]
    for name, caption in figures:
      lines += [f"![{name[:-4]}]({name})", "", caption, ""]
    with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
      f.write("\n".join(lines))
  return os.path.join(out, "report.md")
