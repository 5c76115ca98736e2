"""jaxft.report: plots and report.md from synthetic workdirs, and its command-line errors."""

import json
import os
import subprocess
import sys

import pytest

from jaxft import report
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSIFICATION_ACCURACY = [0.7, 0.8125, 0.79, 0.8]  # best: 0.8125 at step 50
NER_F1 = [0.41, 0.63, 0.7075, 0.69]  # best: 0.7075 at step 75
PER_TYPE = {"PER": {"precision": 0.8, "recall": 0.75, "f1": 0.774, "support": 40},
            "LOC": {"precision": 0.7, "recall": 0.6, "f1": 0.646, "support": 25},
            "ORG": {"precision": 0.5, "recall": 0.55, "f1": 0.524, "support": 18}}


def validation_metrics(kind: str, i: int) -> dict:
  if kind == "token_classification":
    return {"precision": NER_F1[i] + 0.02, "recall": NER_F1[i] - 0.02, "f1": NER_F1[i],
            "token_accuracy": 0.9 + i / 100, "loss": 0.8 - i / 10, "per_type": PER_TYPE}
  return {"accuracy": CLASSIFICATION_ACCURACY[i], "macro_f1": CLASSIFICATION_ACCURACY[i] - 0.05,
          "mcc": 0.4 + i / 20, "loss": 0.6 - i / 20, "eval_seconds": 1.5}


def make_workdir(path, kind="classification", with_eval=True, run_json=True, best_metric=None):
  """A workdir as jaxft.train leaves it: 20 train and 4 validation records (steps 25, 50, 75,
  100), config.json, run.json and (optionally) the evaluation of the best checkpoint."""
  os.makedirs(path, exist_ok=True)
  lines = []
  for i in range(20):
    step = 5 * (i + 1)
    lines.append({"step": step, "split": "train", "loss": 1.0 / (1 + i / 4), "grad_norm": 2.0,
                  "learning_rate": 3e-4 * (1 - i / 20), "examples_per_sec": 900 + 10 * i,
                  "tokens_per_sec": 40000 + 500 * i, "note": "ignored", "epoch": i / 20})
    if step % 25 == 0:
      lines.append({"step": step, "split": "validation", **validation_metrics(kind, step // 25 - 1)})
  with open(path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(line) + "\n" for line in lines))
  config = {"task": {"kind": kind}, "peft": {"method": "lora"},
            "model": {"name_or_path": "/models/minilm", "pooling": "mean"},
            "train": {"batch_size": 32, "learning_rate": 3e-4, "num_epochs": 3.0,
                      "num_train_steps": None},
            "data": {"train_file": "/data/train.tsv", "max_seq_length": 128},
            "checkpoint": {"best_metric": best_metric, "best_mode": None}}
  (path / "config.json").write_text(json.dumps(config))
  labels = ["negative", "positive", "neutral"] if kind == "classification" else ["O", "B-PER"]
  if run_json:
    metric = "accuracy" if kind == "classification" else "f1"
    (path / "run.json").write_text(json.dumps({
        "params": {"trainable": 73_728, "total": 22_786_560, "frozen": 22_712_832},
        "label_names": labels, "best_metric": metric, "best_mode": "max"}))
  if with_eval:
    best_step = 50 if kind == "classification" else 75
    metrics = validation_metrics(kind, best_step // 25 - 1)
    if kind == "classification":
      metrics["confusion_matrix"] = [[30, 4, 2], [5, 25, 3], [1, 2, 8]]
    os.makedirs(path / "eval", exist_ok=True)
    (path / "eval" / f"validation-step{best_step}.json").write_text(json.dumps(
        {"step": best_step, "split": "validation", "checkpoint": "best", "metrics": metrics,
         "label_names": labels}))
  return path


def assert_valid_png(path):
  from matplotlib import image
  assert os.path.isfile(path), f"{path} was not written"
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  assert os.path.getsize(path) > 5_000
  height, width = image.imread(path).shape[:2]
  assert height > 200 and width > 200


def embedded_images(report_md: str) -> list[str]:
  import re
  return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md)


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxft.report", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def _assert_user_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxft: error:"), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_classification_report(tmp_path):
  workdir = make_workdir(tmp_path / "sst2")
  path = report.write_report([str(workdir)])
  out = workdir / "report"
  assert path == str(out / "report.md")
  text = (out / "report.md").read_text()
  expected = ["loss.png", "learning_rate.png", "accuracy.png", "throughput.png",
              "confusion_matrix.png"]
  for name in expected:
    assert_valid_png(out / name)
  assert sorted(embedded_images(text)) == sorted(expected)  # relative paths, each one once
  assert not (out / "entity_f1.png").exists()
  assert "| accuracy | 0.8125 |" in text and "step 50" in text
  assert "| macro_f1 | 0.7625 |" in text
  for value in ("classification", "/models/minilm", "lora", "3.0 epochs", "/data/train.tsv", "128"):
    assert value in text
  assert "73,728 trainable / 22,786,560 total (0.32%)" in text
  assert "jaxft-eval" not in text


def test_ner_report_plots_entity_scores_not_a_confusion_matrix(tmp_path):
  workdir = make_workdir(tmp_path / "conll", kind="token_classification")
  out = tmp_path / "out"
  text = open(report.write_report([str(workdir)], str(out))).read()
  assert_valid_png(out / "entity_f1.png")
  assert_valid_png(out / "f1.png")
  assert not (out / "confusion_matrix.png").exists()
  assert "entity_f1.png" in embedded_images(text)
  assert "| f1 | 0.7075 |" in text and "step 75" in text
  assert "per_type" not in text  # not a scalar: left out of the metrics table


def test_two_workdirs_are_compared(tmp_path):
  first = make_workdir(tmp_path / "a" / "run")
  second = make_workdir(tmp_path / "b" / "run", kind="token_classification")
  out = tmp_path / "compare"
  text = open(report.write_report([str(first), str(second)], str(out))).read()
  assert "| a/run | accuracy (max) | 0.8125 | 50 | 73,728 | 22,786,560 |" in text
  assert "| b/run | f1 (max) | 0.7075 | 75 | 73,728 | 22,786,560 |" in text
  for name in ("loss.png", "learning_rate.png", "throughput.png", "accuracy.png", "f1.png",
               "confusion_matrix_a_run.png", "entity_f1_b_run.png"):
    assert_valid_png(out / name)
    assert name in embedded_images(text)


def test_missing_evaluation_says_how_to_make_one(tmp_path):
  workdir = make_workdir(tmp_path / "run", with_eval=False)
  text = open(report.write_report([str(workdir)])).read()
  assert f"jaxft-eval --workdir={workdir} --checkpoint=best" in text
  assert "confusion_matrix.png" not in text
  assert not (workdir / "report" / "confusion_matrix.png").exists()
  assert_valid_png(workdir / "report" / "accuracy.png")


def test_selection_metric_falls_back_to_config_then_task_default():
  assert report.selection_metric({}, {"best_metric": "mcc", "best_mode": "max"}) == ("mcc", "max")
  config = {"task": {"kind": "mlm"}, "checkpoint": {"best_metric": "loss", "best_mode": "min"}}
  assert report.selection_metric(config, {}) == ("loss", "min")
  config["checkpoint"] = {"best_metric": None, "best_mode": None}
  assert report.selection_metric(config, {}) == ("perplexity", "min")
  assert report.selection_metric({"task": {"kind": "regression"}}, {}) == ("pearson", "max")


def test_newest_best_evaluation_when_none_is_at_the_best_step(tmp_path):
  workdir = make_workdir(tmp_path / "run", with_eval=False)
  os.makedirs(workdir / "eval")
  for step, which in ((60, "best"), (80, "best"), (90, "latest")):
    (workdir / "eval" / f"validation-step{step}.json").write_text(json.dumps(
        {"step": step, "split": "validation", "checkpoint": which, "metrics": {}}))
  record, path = report.best_evaluation(str(workdir), best_step=50)
  assert record["step"] == 80 and path.endswith("validation-step80.json")


def test_command_line_prints_the_report_path(tmp_path):
  workdir = make_workdir(tmp_path / "run")
  result = _run_cli(f"--workdir={workdir}", f"--output={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / "report.md")
  assert_valid_png(tmp_path / "out" / "confusion_matrix.png")


def test_help_describes_each_flag_on_one_line():
  result = _run_cli("--help")  # absl exits 1 after --help
  assert "Traceback" not in result.stderr and "jaxft.report" in result.stdout
  lines = [l.strip() for l in result.stdout.splitlines()]
  for flag in ("--workdir", "--output", "--[no]debug"):
    i = next(i for i, l in enumerate(lines) if l.startswith(flag + ":"))
    assert len(lines[i].split(":", 1)[1].strip()) > 10, lines[i]
    # absl's own notes may follow; a wrapped description would not look like one
    assert lines[i + 1].startswith(("(default", "repeat this option", "--", "Try")), lines[i:i + 2]


@pytest.mark.parametrize("case", ["missing", "no_metrics", "bad_line", "unwritable"])
def test_user_errors(tmp_path, case):
  workdir = make_workdir(tmp_path / "run")
  args, fragments = [f"--workdir={workdir}"], []
  if case == "missing":
    args, fragments = [f"--workdir={tmp_path / 'nope'}"], ["nope does not exist"]
  elif case == "no_metrics":
    os.remove(workdir / "metrics.jsonl")
    fragments = ["has no metrics.jsonl", "train with jaxft.train first"]
  elif case == "bad_line":
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write('{"step": 105, "split": "tra\n')  # a line cut short by a killed run
    fragments = ["line 25 is not JSON"]
  elif case == "unwritable":
    (tmp_path / "a_file").write_text("")  # a folder cannot be made under a file, even by root
    args.append(f"--output={tmp_path / 'a_file' / 'report'}")
    fragments = ["cannot write the report to"]
  _assert_user_error(_run_cli(*args), *fragments)
