r"""Plot runs and summarise them on one page:

  python -m jaxft.report --workdir=DIR [--workdir=DIR2 ...] [--output=OUT]

Reads each workdir's metrics.jsonl, config.json, run.json and eval/*.json (nothing is run on a
model) and writes PNG plots and report.md into OUT (default: <first workdir>/report). With several
workdirs the curves overlay one line per run and report.md compares the runs in a table. A
jaxft-sweep directory is drawn as a sweep (jaxft/sweep/report.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional

from absl import flags

from jaxft import config as config_lib, runtime, storage
from jaxft.errors import fail

CONFIG_SUMMARY_KEYS = ("task.kind", "model.name_or_path", "model.pooling", "peft.method",
                       "train.batch_size", "train.learning_rate", "train.length",
                       "data.train_file", "data.max_seq_length")
CURVE_FILES = ("loss", "learning_rate", "throughput")  # a metric's plot must not overwrite these


@dataclasses.dataclass
class Run:
  workdir: str
  label: str
  config: dict
  info: dict  # run.json
  records: list
  metric: str
  mode: str
  best: Optional[dict]  # the best validation record by `metric`
  evaluation: Optional[dict]  # the eval/*.json record of the best checkpoint
  evaluation_file: Optional[str] = None


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lookup(tree: dict, dotted: str):
  for key in dotted.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def read_json_object(path: str) -> dict:
  """A JSON object file; {} when it is missing (older workdirs may lack run.json)."""
  if not storage.exists(path):
    return {}
  try:
    value = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    fail(f"{path} is not valid JSON ({e}); fix or delete it")
  return value if isinstance(value, dict) else {}


def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl, naming the first bad line (jaxft.metrics.read_metrics would raise raw)."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path) or storage.isdir(path):
    fail(f"{workdir} has no metrics.jsonl; is it a jaxft workdir (train with jaxft.train first)?")
  records = []
  with storage.open_file(path, "rb") as f:
    lines = f.read().decode("utf-8", errors="replace").splitlines()
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      fail(f"{path} line {number} is not JSON ({e.msg}); fix or delete that line")
    if not isinstance(record, dict):
      fail(f"{path} line {number} is not a JSON object; each line must be {{\"step\": ...}}")
    if is_number(record.get("step")):
      records.append(record)
  return sorted(records, key=lambda r: r["step"])  # stable: equal steps keep file order


def selection_metric(config: dict, info: dict) -> tuple[str, str]:
  """(metric, mode): run.json's choice, else the config's, else the task's default."""
  metric = info.get("best_metric") or lookup(config, "checkpoint.best_metric")
  mode = info.get("best_mode") or lookup(config, "checkpoint.best_mode")
  kind = lookup(config, "task.kind")
  return config_lib.selection(kind if kind in config_lib.TASK_KINDS else "classification",
                              metric or None, mode if mode in ("max", "min") else None)


def series(records: list[dict], split: str, key: str) -> tuple[list, list]:
  """(steps, values) of `key` in `split` records, skipping missing, non-numeric and NaN values."""
  points = [(r["step"], r[key]) for r in records if r.get("split") == split and is_number(r.get(key))]
  return [p[0] for p in points], [p[1] for p in points]


def best_record(records: list[dict], metric: str, mode: str) -> Optional[dict]:
  """The validation record best by `metric`; on a tie the earliest, as checkpointing keeps it."""
  candidates = [r for r in records if r.get("split") == "validation" and is_number(r.get(metric))]
  if not candidates:
    return None
  sign = 1 if mode == "max" else -1
  return max(candidates, key=lambda r: (sign * r[metric], -r["step"]))


def best_evaluation(workdir: str, best_step) -> tuple[Optional[dict], Optional[str]]:
  """The validation eval file at the best step; else the newest one of checkpoint=best."""
  evaluations = []
  folder = storage.join(workdir, "eval")
  for name in storage.listdir(folder):
    if not name.endswith(".json"):
      continue
    path = storage.join(folder, name)
    try:
      record = json.loads(storage.read_text(path))
    except (OSError, ValueError):
      continue  # a half-written or foreign file is not an evaluation
    if (isinstance(record, dict) and record.get("split") == "validation"
        and isinstance(record.get("metrics"), dict)):
      evaluations.append((record, path))
  at_best_step = [e for e in evaluations if best_step is not None and e[0].get("step") == best_step]
  of_best = [e for e in evaluations if str(e[0].get("checkpoint")) == "best"]
  chosen = at_best_step or sorted(  # equal steps: file names sort as they were written
      of_best, key=lambda e: (e[0].get("step") if is_number(e[0].get("step")) else -1, e[1]))
  return chosen[-1] if chosen else (None, None)


def run_labels(workdirs: list[str]) -> list[str]:
  """Workdir basenames; equal ones get their parent folder, then a number if still equal."""
  paths = [storage.absolute(w).rstrip("/") for w in workdirs]
  names = [p.rsplit("/", 1)[-1] for p in paths]
  labels = [f"{storage.parent(p).rsplit('/', 1)[-1]}/{n}" if names.count(n) > 1 else n
            for p, n in zip(paths, names)]
  return [f"{l} ({labels[:i].count(l) + 1})" if labels.count(l) > 1 else l
          for i, l in enumerate(labels)]


def load_run(workdir: str, label: str) -> Run:
  if not storage.isdir(workdir):
    fail(f"--workdir={workdir} does not exist (or is not a directory)")
  records = read_records(workdir)
  config = read_json_object(storage.join(workdir, "config.json"))
  info = read_json_object(storage.join(workdir, "run.json"))
  metric, mode = selection_metric(config, info)
  best = best_record(records, metric, mode)
  evaluation, path = best_evaluation(workdir, best["step"] if best else None)
  return Run(workdir, label, config, info, records, metric, mode, best, evaluation, path)


# --- plots -------------------------------------------------------------------------------------

def pyplot():
  import matplotlib  # imported here: it costs ~1 s, and errors should not wait for it
  matplotlib.use("Agg")  # no display
  from matplotlib import pyplot as plt
  return plt


def save_figure(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


def plot_curves(runs: list[Run], path: str, title: str, panels: list, mark_best: bool = False) -> bool:
  """One panel per (ylabel, [(split, key, style), ...]) in `panels`, one colour per run. Panels
  no run has data for are left out; returns False (and writes nothing) when none is left."""
  drawn = [(ylabel, lines) for ylabel, lines in panels
           if any(series(run.records, split, key)[0] for run in runs for split, key, _ in lines)]
  if not drawn:
    return False
  plt = pyplot()
  fig, axes = plt.subplots(len(drawn), 1, figsize=(8, 1.5 + 3 * len(drawn)), sharex=True,
                           squeeze=False)
  for ax, (ylabel, lines) in zip(axes[:, 0], drawn):
    for i, run in enumerate(runs):
      for split, key, style in lines:
        steps, values = series(run.records, split, key)
        name = " ".join(([run.label] if len(runs) > 1 else []) + ([split] if len(lines) > 1 else []))
        ax.plot(steps, values, style, color=f"C{i}", label=name or key, markersize=4)
      if mark_best and run.best is not None:
        ax.plot(run.best["step"], run.best[run.metric], "*", color=f"C{i}", markersize=16,
                markeredgecolor="black")
        ax.annotate(f"best {run.best[run.metric]:.4f} @ {run.best['step']}",
                    (run.best["step"], run.best[run.metric]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(y=0.12)  # room for the best point's note
    if len(runs) > 1 or len(lines) > 1:  # a lone line needs no legend
      ax.legend(fontsize=8)
  axes[0, 0].set_title(title)
  axes[-1, 0].set_xlabel("step")
  save_figure(fig, path)
  return True


def plot_confusion_matrix(matrix: list, label_names: list, path: str, title: str) -> None:
  import numpy as np
  counts = np.asarray(matrix, dtype=float)
  n = len(counts)
  names = [str(x) for x in label_names] if len(label_names) == n else [str(i) for i in range(n)]
  size = min(3.5 + 0.45 * n, 16)
  fig, ax = pyplot().subplots(figsize=(size + 1.2, size))
  image = ax.imshow(counts, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046)
  ax.set_xticks(range(n), names, rotation=45, ha="right")
  ax.set_yticks(range(n), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("gold")
  ax.set_title(title)
  if n <= 40:  # beyond that the numbers no longer fit their cells
    dark = counts.max() / 2
    for row in range(n):
      for col in range(n):
        ax.text(col, row, f"{counts[row, col]:.0f}", ha="center", va="center", fontsize=8,
                color="white" if counts[row, col] > dark else "black")
  save_figure(fig, path)


def plot_entity_scores(per_type: dict, path: str, title: str) -> None:
  import numpy as np
  types = sorted(per_type)
  x = np.arange(len(types))
  fig, ax = pyplot().subplots(figsize=(max(6, 1.2 * len(types) + 2), 4.5))
  for j, key in enumerate(("precision", "recall", "f1")):
    values = [per_type[t].get(key) if is_number(per_type[t].get(key)) else 0 for t in types]
    ax.bar(x + (j - 1) * 0.27, values, 0.27, label=key, color=f"C{j}")
  support = [per_type[t].get("support") for t in types]
  ax.set_xticks(x, [f"{t}\n(n={s})" if is_number(s) else t for t, s in zip(types, support)])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("score")
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  save_figure(fig, path)


def is_square_matrix(value) -> bool:
  return (isinstance(value, list) and len(value) > 0 and all(
      isinstance(row, list) and len(row) == len(value) and all(map(is_number, row)) for row in value))


def file_stem(text: str) -> str:
  return re.sub(r"[^\w.-]+", "_", text).strip("_") or "run"


def plot_evaluation(run: Run, out: str, several: bool) -> Optional[tuple[str, str]]:
  """(file name, caption) of the best checkpoint's confusion matrix or per-entity scores."""
  metrics, step = run.evaluation["metrics"], run.evaluation.get("step")
  suffix = f"_{file_stem(run.label)}" if several else ""
  if is_square_matrix(metrics.get("confusion_matrix")):
    names = run.evaluation.get("label_names") or run.info.get("label_names") or []
    name = f"confusion_matrix{suffix}.png"
    plot_confusion_matrix(metrics["confusion_matrix"], names, os.path.join(out, name),
                          f"{run.label}: confusion matrix, step {step}")
    return name, (f"Confusion matrix of the best checkpoint (step {step}) on validation: rows "
                  "are gold labels, columns predictions, cells count examples.")
  per_type = metrics.get("per_type")
  if isinstance(per_type, dict) and per_type and all(isinstance(v, dict) for v in per_type.values()):
    name = f"entity_f1{suffix}.png"
    plot_entity_scores(per_type, os.path.join(out, name), f"{run.label}: per-entity scores, step {step}")
    return name, (f"Precision, recall and F1 per entity type of the best checkpoint (step {step}) "
                  "on validation.")
  return None


def plot_all_curves(runs: list[Run], out: str) -> list[tuple[str, str]]:
  """(file name, caption) of each curve plot written."""
  written = []
  if plot_curves(runs, os.path.join(out, "loss.png"), "loss",
                 [("loss", [("train", "loss", "-"), ("validation", "loss", "o--")])]):
    written.append(("loss.png", "Training loss (solid) and validation loss (dashed) against step."))
  if plot_curves(runs, os.path.join(out, "learning_rate.png"), "learning rate",
                 [("learning rate", [("train", "learning_rate", "-")])]):
    written.append(("learning_rate.png", "The learning-rate schedule against step."))
  for metric in dict.fromkeys(run.metric for run in runs):  # runs may select on different metrics
    group = [run for run in runs if run.metric == metric]
    name = file_stem(metric) + ("_validation" if file_stem(metric) in CURVE_FILES else "") + ".png"
    if plot_curves(group, os.path.join(out, name), f"validation {metric}",
                   [(metric, [("validation", metric, "o-")])], mark_best=True):
      written.append((name, f"Validation {metric} against step; the star marks the best "
                            f"({group[0].mode})."))
  if plot_curves(runs, os.path.join(out, "throughput.png"), "training throughput",
                 [("examples / s", [("train", "examples_per_sec", "-")]),
                  ("tokens / s", [("train", "tokens_per_sec", "-")])]):
    written.append(("throughput.png", "Training throughput against step: examples per second "
                                      "(top) and tokens per second (bottom)."))
  return written


# --- report.md ---------------------------------------------------------------------------------

def config_value(config: dict, key: str):
  if key == "train.length":  # num_train_steps, when set, overrides num_epochs
    steps = lookup(config, "train.num_train_steps")
    return f"{steps} steps" if steps is not None else f"{lookup(config, 'train.num_epochs')} epochs"
  return lookup(config, key)


def param_summary(info: dict) -> str:
  params = info.get("params") or {}
  trainable, total = params.get("trainable"), params.get("total")
  if not (is_number(trainable) and is_number(total) and total > 0):
    return "unknown (no params in run.json)"
  return f"{trainable:,} trainable / {total:,} total ({100 * trainable / total:.2f}%)"


def format_value(value) -> str:
  return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def run_section(run: Run, out: str, several: bool) -> list[str]:
  lines = [f"## {run.label}", "", f"Workdir: `{storage.absolute(run.workdir)}`", "",
           "| config | value |", "|---|---|"]
  lines += [f"| {key.replace('train.length', 'train.num_epochs / num_train_steps')} | "
            f"{config_value(run.config, key)} |" for key in CONFIG_SUMMARY_KEYS]
  lines += ["", f"Parameters: {param_summary(run.info)}", ""]
  if run.best is None:
    lines += [f"No validation record in metrics.jsonl holds {run.metric}.", ""]
  else:
    lines += [f"Best validation metrics (step {run.best['step']}, by {run.metric}, {run.mode}):", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {format_value(v)} |" for k, v in run.best.items()
              if k not in ("step", "split") and is_number(v)]
    lines.append("")
  if run.evaluation is None:
    lines += [f"No evaluation of the best checkpoint yet; make one with `jaxft-eval "
              f"--workdir={run.workdir} --checkpoint=best` and rerun the report.", ""]
  else:
    plot = plot_evaluation(run, out, several)
    relative = run.evaluation_file[len(storage.join(run.workdir, "")):]
    lines += [f"Evaluation of the best checkpoint: `{relative}`.", ""]
    if plot:
      lines += [f"![{plot[0][:-4]}]({plot[0]})", "", plot[1], ""]
  return lines


def comparison_table(runs: list[Run]) -> list[str]:
  lines = ["| run | metric | best | step | trainable params | total params |",
           "|---|---|---|---|---|---|"]
  for run in runs:
    params = run.info.get("params") or {}
    best, step = (f"{run.best[run.metric]:.4f}", run.best["step"]) if run.best else ("-", "-")
    trainable, total = (f"{params[k]:,}" if is_number(params.get(k)) else "-"
                        for k in ("trainable", "total"))
    lines.append(f"| {run.label} | {run.metric} ({run.mode}) | {best} | {step} | {trainable} | "
                 f"{total} |")
  return lines + [""]


def prepare_output(out: str) -> None:
  """Fails early, before any plotting, when `out` cannot take files."""
  try:
    storage.makedirs(out)
    probe = storage.join(out, ".jaxft-report-probe")
    storage.write_text(probe, "")
    storage.remove(probe)
  except OSError as e:
    fail(f"cannot write the report to {out}: {e.strerror or e}; pass a writable --output=DIR")


def write_report(workdirs: list[str], out: Optional[str] = None) -> str:
  """Writes the plots and report.md into `out`; returns the path of report.md."""
  if not workdirs:
    fail("--workdir is required: a run directory written by jaxft.train")
  from jaxft.sweep import report as sweep_report
  if len(workdirs) == 1 and sweep_report.is_sweep(workdirs[0]):  # jaxft-sweep's directory
    return sweep_report.write_sweep_report(workdirs[0], out)
  runs = [load_run(w, label) for w, label in zip(workdirs, run_labels(workdirs))]
  out = out or storage.join(workdirs[0], "report")
  prepare_output(out)
  several = len(runs) > 1
  lines = ["# jaxft report: " + ", ".join(run.label for run in runs), ""]
  with storage.local_folder(out) as folder:  # plots of a gs:// output are drawn here, copied up
    if several:
      lines += comparison_table(runs)
    for run in runs:
      lines += run_section(run, folder, several)
    curves = plot_all_curves(runs, folder)
    if curves:
      lines += ["## Curves", ""]
      for name, caption in curves:
        lines += [f"![{name[:-4]}]({name})", "", caption, ""]
    with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
      f.write("\n".join(lines))
  return storage.join(out, "report.md")


def run() -> None:
  """Console script `jaxft-report` (flags defined here, not at import: see jaxft.train.run)."""
  workdir_flag = flags.DEFINE_multi_string("workdir", None,
                                           "Run directory written by jaxft.train; repeat to compare runs")
  output_flag = flags.DEFINE_string("output", None,
                                    "Folder for the plots and report.md (default: WORKDIR/report).")
  runtime.run_main(lambda: print(write_report(workdir_flag.value or [], output_flag.value)))

if __name__ == "__main__":
  run()
