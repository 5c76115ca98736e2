r"""Few-shot suite: SST-2 with K examples per label, jaxft's contrastive method (SetFit's),
jaxft's head fine-tuning at the same K, zero-shot label descriptions, and (where torch and
setfit are installed) the `setfit` library on the identical subsets and hyperparameters.

  python benchmarks/fewshot.py --train_file=SST2/train.tsv --validation_file=SST2/dev.tsv \
    [--ks=8,16,64] [--seeds=5] [--setfit] [--out=results.json]

jaxft's contrastive runs use configs/sst2_fewshot_minilm.py, whose head adds a label-description
prior to the logistic regression; "setfit's head" refits the logistic regression alone on the
same run's encoder (the like-for-like comparison). Each (K, seed) draws its subset once
(data.examples_per_class, data.few_shot_seed=seed: the rows jaxft's run.json lists are the
rows setfit gets). Accuracy runs share one process per library (jaxft in this one, setfit in
one child); then the wall time from process start to metrics of one jaxft-train command (its
compilation caches cold) and one setfit process for each of K=8 and K=64 (seed 0), run one
after the other on a quiet machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

import bench  # noqa: E402 - beside this file: timed_process
from jaxft import config as config_lib, fewshot, inference, models, train
from jaxft.config import load_config_file
from jaxft.data.encode import read_split

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")
FEWSHOT_CONFIG = os.path.join(CONFIGS, "sst2_fewshot_minilm.py")
ZEROSHOT_CONFIG = os.path.join(CONFIGS, "sst2_zeroshot_minilm.py")
SUPERVISED_CONFIG = os.path.join(CONFIGS, "sst2_minilm.py")
# Head fine-tuning at K examples per label: configs/sst2_minilm.py's rate and batch size,
# enough epochs for as many steps as the contrastive run takes at K = 8.
SUPERVISED_EPOCHS = 40.0


def _quiet_config(path: str, files: dict, values: dict):
  config = load_config_file(path)
  return config_lib.replace(config, {"data.train_file": files["train"],
                                     "data.validation_file": files["validation"],
                                     "checkpoint.keep_latest": 1, **values})


def jaxft_accuracy(path: str, files: dict, values: dict, workdir: str) -> dict:
  """One in-process jaxft run: its final dev accuracy, seconds and few-shot rows."""
  began = time.perf_counter()
  metrics = train.train_and_evaluate(_quiet_config(path, files, values), workdir)
  with open(os.path.join(workdir, "run.json")) as f:
    run = json.load(f)
  return {"accuracy": metrics["accuracy"], "seconds": time.perf_counter() - began,
          "rows": run.get("few_shot_examples"), "steps": run["num_train_steps"]}


def with_setfits_head(workdir: str) -> float:
  """The dev accuracy of a contrastive run's final encoder under the logistic regression
  alone (setfit's head, no description prior): the like-for-like comparison with setfit."""
  exp, _, params = inference.restore(workdir)
  with open(os.path.join(workdir, "run.json")) as f:
    rows = json.load(f)["few_shot_examples"]
  data, _ = read_split(exp.config.data.train_file, exp.config, exp.tokenizer, exp.label_names,
                       None, subset=lambda labels, names: rows)
  head = fewshot.fit_head(fewshot.Embedder(exp)(params, data), np.asarray(data.labels),
                          len(exp.label_names), exp.config.train.contrastive.head_inverse_l2)
  return inference.Predictor(exp).evaluate(fewshot.replace_head(params, head),
                                           exp.load_split("validation"))["accuracy"]


def setfit_hyperparameters(config) -> dict:
  t = config.train
  return {"batch_size": t.batch_size, "num_epochs": int(t.num_epochs),
          "num_iterations": t.contrastive.num_iterations,
          "body_learning_rate": t.learning_rate, "max_length": config.data.max_seq_length}


def setfit_runs(jobs: list[dict], files: dict, config) -> tuple[list[dict], float]:
  """The setfit library on `jobs` ({"name", "seed", "rows"}), one child process."""
  spec = {"model_dir": models.resolve_model_dir("minilm"), "validation_file": files["validation"],
          "text_field": "sentence", "label_field": "label", **setfit_hyperparameters(config),
          "jobs": [{**j, "train_file": files["train"]} for j in jobs]}
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(spec, f)
  out = subprocess.run([sys.executable, os.path.join(HERE, "setfit_baseline.py"), f.name],
                       capture_output=True, text=True, env={**os.environ,
                                                            "TOKENIZERS_PARALLELISM": "false"})
  if out.returncode != 0:
    raise RuntimeError(f"setfit_baseline.py exited {out.returncode}:\n{out.stderr[-3000:]}")
  marker = "setfit_baseline: "
  lines = [json.loads(line[len(marker):]) for line in out.stdout.splitlines()
           if line.startswith(marker)]
  return lines[:-1], lines[-1]["process_seconds"]


def _mean_std(values) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": list(values)}


def few_shot_rows(train_file: str, k: int, seed: int) -> list[int]:
  """The rows a run with data.examples_per_class=k, data.few_shot_seed=seed trains on."""
  import csv
  with open(train_file, encoding="utf-8", newline="") as f:
    labels = np.array([int(r["label"]) for r in csv.DictReader(f, delimiter="\t",
                                                                quoting=csv.QUOTE_NONE)])
  return fewshot.sample_per_class(labels, k, seed, ("negative", "positive"), train_file).tolist()


def setfit_accuracy(files: dict, ks: list[int], seeds: int) -> dict:
  """The setfit library alone on the subsets jaxft's runs would draw."""
  jobs = [{"name": f"{k}/{s}", "seed": s, "rows": few_shot_rows(files["train"], k, s)}
          for k in ks for s in range(seeds)]
  runs, _ = setfit_runs(jobs, files, load_config_file(FEWSHOT_CONFIG))
  out = {}
  for k in ks:
    mine = [r for r in runs if r["name"].startswith(f"{k}/")]
    out[k] = {**_mean_std([r["accuracy"] for r in mine]),
              "seconds": float(np.mean([r["seconds"] for r in mine]))}
  return out


def accuracy_suite(files: dict, ks: list[int], seeds: int, with_setfit: bool) -> dict:
  config = load_config_file(FEWSHOT_CONFIG)
  result = {"hyperparameters": setfit_hyperparameters(config), "k": {}}
  jobs = []
  with tempfile.TemporaryDirectory() as tmp:
    zero = jaxft_accuracy(ZEROSHOT_CONFIG, files, {}, os.path.join(tmp, "zero"))
    result["zero_shot"] = zero["accuracy"]
    for k in ks:
      rows = {"contrastive": [], "setfits_head": [], "supervised": []}
      for seed in range(seeds):
        few = {"data.examples_per_class": k, "data.few_shot_seed": seed, "seed": seed}
        run = jaxft_accuracy(FEWSHOT_CONFIG, files, few, os.path.join(tmp, f"c{k}_{seed}"))
        rows["contrastive"].append(run)
        rows["setfits_head"].append({**run, "accuracy": with_setfits_head(
            os.path.join(tmp, f"c{k}_{seed}"))})
        jobs.append({"name": f"{k}/{seed}", "seed": seed, "rows": run["rows"]})
        rows["supervised"].append(jaxft_accuracy(
            SUPERVISED_CONFIG, files, {**few, "train.num_epochs": SUPERVISED_EPOCHS,
                                       "train.num_evaluations": 1},
            os.path.join(tmp, f"s{k}_{seed}")))
        print(f"K={k} seed {seed}: contrastive {rows['contrastive'][-1]['accuracy']:.4f} "
              f"(setfit's head {rows['setfits_head'][-1]['accuracy']:.4f}), head fine-tuning "
              f"{rows['supervised'][-1]['accuracy']:.4f}", flush=True)
      result["k"][k] = {name: {**_mean_std([r["accuracy"] for r in runs]),
                               "seconds": float(np.mean([r["seconds"] for r in runs])),
                               "steps": runs[0]["steps"]}
                        for name, runs in rows.items()}
  if with_setfit:
    runs, _ = setfit_runs(jobs, files, config)
    for k in ks:
      mine = [r for r in runs if r["name"].startswith(f"{k}/")]
      result["k"][k]["setfit"] = {**_mean_std([r["accuracy"] for r in mine]),
                                  "seconds": float(np.mean([r["seconds"] for r in mine]))}
  return result


def wall_time_suite(files: dict, ks: list[int], with_setfit: bool) -> dict:
  """Process start to metrics: one jaxft-train (its compilation caches cold) and one setfit
  process."""
  out = {}
  config = load_config_file(FEWSHOT_CONFIG)
  for k in ks:
    with tempfile.TemporaryDirectory() as tmp:
      cmd = [sys.executable, "-m", "jaxft.train", f"--config={FEWSHOT_CONFIG}",
             f"--workdir={tmp}/run", f"--config.data.train_file={files['train']}",
             f"--config.data.validation_file={files['validation']}",
             f"--config.data.examples_per_class={k}"]
      env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "cache")}
      out[k] = {"jaxft_cold_s": bench.timed_process(cmd, env)["wall_s"]}
      with open(f"{tmp}/run/run.json") as f:
        rows = json.load(f)["few_shot_examples"]
    if with_setfit:
      began = time.perf_counter()
      setfit_runs([{"name": str(k), "seed": config.seed, "rows": rows}], files, config)
      out[k]["setfit_s"] = time.perf_counter() - began
  return out


def table(result: dict) -> str:
  lines = ["| K per label | jaxft contrastive | the same, setfit's head | jaxft head "
           "fine-tuning | setfit library |", "|---|---|---|---|---|"]
  cell = lambda r: f"{r['mean']:.4f} ± {r['std']:.4f}" if r else "-"
  for k, rows in result["accuracy"]["k"].items():
    lines.append(f"| {k} | {cell(rows['contrastive'])} | {cell(rows['setfits_head'])} | "
                 f"{cell(rows['supervised'])} | {cell(rows.get('setfit'))} |")
  lines.append(f"\nzero-shot (label descriptions): {result['accuracy']['zero_shot']:.4f}")
  for k, times in result.get("wall", {}).items():
    lines.append(f"K={k}, process start to metrics: " + ", ".join(
        f"{name} {seconds:.1f} s" for name, seconds in times.items()))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  F = flags.FLAGS
  files = {"train": F.train_file, "validation": F.validation_file}
  ks = [int(k) for k in F.ks]
  wall_ks = [k for k in (8, 64) if k in ks]
  if F.only == "setfit":
    result = {"setfit": setfit_accuracy(files, ks, F.seeds)}
  elif F.only == "wall":
    result = {"wall": wall_time_suite(files, wall_ks, F.setfit)}
  else:
    result = {"accuracy": accuracy_suite(files, ks, F.seeds, F.setfit)}
    if F.wall:
      result["wall"] = wall_time_suite(files, wall_ks, F.setfit)
  print(json.dumps(result, indent=1) if F.only else table(result))
  if F.out:
    with open(F.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  flags.DEFINE_string("train_file", None, "SST-2 train.tsv", required=True)
  flags.DEFINE_string("validation_file", None, "SST-2 dev.tsv", required=True)
  flags.DEFINE_list("ks", ["8", "16", "64"], "Examples per label.")
  flags.DEFINE_integer("seeds", 5, "Sampling seeds per K (seed = few_shot_seed = s).")
  flags.DEFINE_bool("setfit", False, "Also run the setfit library (torch and setfit needed).")
  flags.DEFINE_bool("wall", True, "Time process start to metrics for K=8 and K=64.")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")
  flags.DEFINE_enum("only", None, ["setfit", "wall"], "Run only the setfit library's accuracy "
                    "runs, or only the wall-time runs.")
  app.run(main)
