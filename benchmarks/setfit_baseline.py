r"""The `setfit` library (PyTorch) on given few-shot subsets: what benchmarks/fewshot.py compares
jaxft's contrastive method with, written as setfit's README writes it.

  python benchmarks/setfit_baseline.py JOBS.json

JOBS.json: {"model_dir", "validation_file", "text_field", "label_field", "batch_size",
"num_epochs", "num_iterations", "body_learning_rate", "max_length", "jobs": [{"name", "seed",
"rows": [row indices of the training file], "train_file"}]}. Prints one line per job,
RESULT + {"name", "accuracy", "seconds"} as JSON (seconds: training and evaluation, after the imports and the
data reading), and the seconds since the process started on the last line.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


RESULT = "setfit_baseline: "  # marks this script's lines among the library's own prints


def read_tsv(path: str, text_field: str, label_field: str) -> tuple[list[str], list[int]]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [r[text_field] for r in rows], [int(r[label_field]) for r in rows]


def accuracy_of(predictions, references) -> dict:
  return {"accuracy": sum(int(p) == int(r) for p, r in zip(predictions, references))
          / len(references)}


def main(path: str) -> None:
  with open(path) as f:
    spec = json.load(f)
  from datasets import Dataset
  from setfit import SetFitModel, Trainer, TrainingArguments
  dev_texts, dev_labels = read_tsv(spec["validation_file"], spec["text_field"],
                                   spec["label_field"])
  dev = Dataset.from_dict({"text": dev_texts, "label": dev_labels})
  scratch = tempfile.mkdtemp()  # the trainer's checkpoints, not the working directory
  files = {}
  for job in spec["jobs"]:
    if job["train_file"] not in files:
      files[job["train_file"]] = read_tsv(job["train_file"], spec["text_field"],
                                          spec["label_field"])
    texts, labels = files[job["train_file"]]
    began = time.perf_counter()
    train = Dataset.from_dict({"text": [texts[i] for i in job["rows"]],
                               "label": [labels[i] for i in job["rows"]]})
    model = SetFitModel.from_pretrained(spec["model_dir"])
    args = TrainingArguments(batch_size=spec["batch_size"], num_epochs=spec["num_epochs"],
                             num_iterations=spec["num_iterations"],
                             body_learning_rate=spec["body_learning_rate"],
                             max_length=spec["max_length"], seed=job["seed"],
                             report_to="none", show_progress_bar=False,
                             output_dir=os.path.join(scratch, "checkpoints"))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      metric=accuracy_of)  # a function: "accuracy" would be fetched from the hub
    trainer.train()
    accuracy = trainer.evaluate()["accuracy"]
    print(RESULT + json.dumps({"name": job["name"], "accuracy": accuracy,
                               "seconds": time.perf_counter() - began}), flush=True)
  print(RESULT + json.dumps({"process_seconds": time.perf_counter() - START}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
