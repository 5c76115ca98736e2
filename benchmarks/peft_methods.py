r"""PEFT suite: every parameter-efficient method against full fine-tuning on SST-2.

  python benchmarks/peft_methods.py --train_file=SST2/train.tsv --validation_file=SST2/dev.tsv \
    [--methods=full,lora,dora,ia3,adapter,prompt,prefix] [--sweep] [--seeds=0,1,2] \
    [--max_train_examples=2000] [--out=results.jsonl]

Each run: the default model, the first --max_train_examples training sentences, one epoch,
all dev sentences. --sweep runs each method's learning rates (LEARNING_RATES) with the first
seed; otherwise each method runs at its chosen rate (the first of its list, the sweep's best)
for every seed. One JSON line per run: dev accuracy, the trainable fraction, the size of one
checkpoint on disk, and the median train step time (steps after the first log, where nothing
compiles). Methods run in this one process, one after the other: time on a quiet machine.

--interop=ia3,dora,prompt,prefix trains each with the Hugging Face head (model.pooling=default,
which PEFT's BertForSequenceClassification has), exports --format=peft (and --format=hf where
the method merges), loads the exports in PyTorch (peft.PeftModel, transformers) and compares
their logits and accuracy on every dev sentence with jaxft's.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import bench  # noqa: E402 - beside this file: folder_bytes
from jaxft import config as config_lib, export, inference, step, train
from jaxft.data import batching
from jaxft.config import load_config_file
from jaxft.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")

# method -> (config file, overrides). The shipped configs are the sweep's winners.
METHODS = {
    "full": ("sst2_minilm.py", {}),
    "lora": ("sst2_minilm_lora.py", {}),
    "dora": ("sst2_minilm_lora.py", {"peft.lora.use_dora": True}),
    "ia3": ("sst2_minilm_peft.py", {"peft.method": "ia3"}),
    "adapter": ("sst2_minilm_peft.py", {"peft.method": "adapter"}),
    "pfeiffer": ("sst2_minilm_peft.py", {"peft.method": "adapter",
                                         "peft.adapter.kind": "pfeiffer"}),
    "prompt": ("sst2_minilm_peft.py", {"peft.method": "prompt"}),
    "prefix": ("sst2_minilm_peft.py", {"peft.method": "prefix"}),
    "prefix_mlp": ("sst2_minilm_peft.py", {"peft.method": "prefix",
                                           "peft.prefix.projection_dim": 384}),
}
# The chosen rate first (the sweep's best on seed 0), then the others the sweep tried.
LEARNING_RATES = {
    "full": (1e-4,), "lora": (1e-3, 2e-3, 5e-4), "dora": (1e-3, 2e-3, 5e-4),
    "ia3": (1e-2, 5e-3, 3e-2), "adapter": (2e-3, 1e-3), "pfeiffer": (2e-3,),
    "prompt": (3e-2, 1e-2, 1e-1), "prefix": (1e-2, 3e-3, 3e-2), "prefix_mlp": (1e-3,),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("train_file", None, "SST-2 train.tsv")
flags.DEFINE_string("validation_file", None, "SST-2 dev.tsv")
flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (--sweep: the first).")
flags.DEFINE_bool("sweep", False, "Every learning rate of each method, first seed.")
flags.DEFINE_integer("max_train_examples", 2000, "Training sentences.")
flags.DEFINE_string("out", None, "JSON lines file to append to.")
flags.DEFINE_list("interop", [], "Methods whose exports to check in PyTorch instead.")


def _config(method: str, lr: float, seed: int):
  path, overrides = METHODS[method]
  config = load_config_file(os.path.join(CONFIGS, path))
  return config_lib.replace(config, {
      "data.train_file": FLAGS.train_file, "data.validation_file": FLAGS.validation_file,
      "data.max_train_examples": FLAGS.max_train_examples, "train.learning_rate": lr,
      "seed": seed, "checkpoint.keep_latest": 1, **overrides})


def checkpoint_bytes(workdir: str) -> int:
  """The size of the newest checkpoint on disk (one step's folder)."""
  root = os.path.join(workdir, "checkpoints")
  newest = max((d for d in os.listdir(root) if d.isdigit()), key=int)
  return bench.folder_bytes(os.path.join(root, newest))


def run_one(method: str, lr: float, seed: int) -> dict:
  config = _config(method, lr, seed)
  with tempfile.TemporaryDirectory(prefix=f"peft-{method}-") as workdir:
    start = time.perf_counter()
    final = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    records = read_metrics(workdir, "train")
    with open(os.path.join(workdir, "run.json")) as f:
      params = json.load(f)["params"]
    step_ms = [1e3 * config.train.batch_size / r["examples_per_sec"] for r in records[1:]]
    return {"method": method, "lr": lr, "seed": seed, "accuracy": final["accuracy"],
            "trainable": params["trainable"], "total": params["total"],
            "trainable_fraction": params["trainable"] / params["total"],
            "checkpoint_bytes": checkpoint_bytes(workdir),
            "step_ms": statistics.median(step_ms) if step_ms else None, "wall_s": wall,
            "peft.method": config.peft.method, "pooling": config.model.pooling}


def _dev_logits(exp, params) -> tuple[np.ndarray, dict]:
  """jaxft's logits for every dev example, and the batch (virtual tokens included)."""
  data = exp.load_split("validation")
  host = batching.make_batch(data, np.arange(len(data)), len(data), exp.buckets)
  full = step.combine(jax.device_get(params), exp.frozen_init)
  chunks = [exp.logits(full, {k: jnp.asarray(v[i:i + 128]) for k, v in host.items()}, None,
                       False) for i in range(0, len(data), 128)]
  return np.concatenate([np.asarray(c) for c in chunks]), host


def _torch_logits(model, host: dict) -> np.ndarray:
  """Logits of a PyTorch model on the batch's text tokens (PEFT adds virtual tokens itself)."""
  import torch
  real = host["input_ids"] >= 0
  n = len(host["input_ids"])
  inputs = {k: torch.tensor(host[k][real].reshape(n, -1)).long()
            for k in ("input_ids", "attention_mask", "token_type_ids")}
  with torch.no_grad():
    return np.concatenate([model(**{k: v[i:i + 128] for k, v in inputs.items()}).logits.numpy()
                           for i in range(0, n, 128)])


def interop(method: str, seed: int) -> dict:
  import peft as peft_lib
  from transformers import AutoModelForSequenceClassification
  lr = LEARNING_RATES[method][0]
  config = config_lib.replace(_config(method, lr, seed), {"model.pooling": "default"})
  with tempfile.TemporaryDirectory(prefix=f"peft-interop-{method}-") as workdir:
    final = train.train_and_evaluate(config, workdir)
    exp, _, params = inference.restore(workdir, "latest")
    ours, host = _dev_logits(exp, params)
    labels = host["labels"]
    result = {"method": method, "lr": lr, "seed": seed, "jaxft_accuracy": final["accuracy"],
              "jaxft_logits_accuracy": float(np.mean(ours.argmax(-1) == labels))}
    formats = ["peft"] + (["hf"] if method in ("ia3", "dora", "lora") else [])
    for fmt in formats:
      out = os.path.join(workdir, f"export-{fmt}")
      export.export(workdir, out, fmt, "latest")
      if fmt == "peft":
        base = AutoModelForSequenceClassification.from_pretrained(exp.model_dir, num_labels=2)
        model = peft_lib.PeftModel.from_pretrained(base, out).eval()
      else:
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
      theirs = _torch_logits(model, host)
      result[f"{fmt}_max_abs_diff"] = float(np.abs(theirs - ours).max())
      result[f"{fmt}_accuracy"] = float(np.mean(theirs.argmax(-1) == labels))
    return result


def main(_):
  seeds = [int(s) for s in FLAGS.seeds]
  for method in FLAGS.interop:
    line = json.dumps(interop(method, seeds[0]))
    print("peft_interop: " + line, flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(line + "\n")
  if FLAGS.interop:
    return
  for method in FLAGS.methods:
    rates = LEARNING_RATES[method] if FLAGS.sweep else LEARNING_RATES[method][:1]
    for lr in rates:
      for seed in (seeds[:1] if FLAGS.sweep else seeds):
        result = run_one(method, lr, seed)
        line = json.dumps(result)
        print("peft_result: " + line, flush=True)
        if FLAGS.out:
          with open(FLAGS.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["train_file", "validation_file"])
  app.run(main)
