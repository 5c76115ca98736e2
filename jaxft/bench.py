r"""Benchmarks: `python -m jaxft.bench [--batch=32 --length=64 --steps=5 --out=bench.json]`.

Measures, in one process and one run, the train-step time of the PEFT methods against full
fine-tuning at the same batch and sequence length (the default model, fixed shapes, compile time
excluded), and the size of one checkpoint of each. Prints a markdown table of ratios against full
fine-tuning and writes the numbers as JSON. Run it on a quiet machine: timings are wall clock.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import flags

from jaxft import experiment, runtime
from jaxft.checkpoint import Checkpoints
from jaxft.config import base_config
from jaxft.data.encode import Encoded


METHODS = (("full", {"peft.method": "none"}),
           ("lora r8 q,v", {"peft.method": "lora"}),
           ("bitfit", {"peft.method": "bitfit"}),
           ("head only", {"peft.method": "freeze"}))


def _config(overrides: dict, batch: int, length: int):
  c = base_config()
  c.data.train_file = "unused"
  c.data.max_seq_length = length
  c.data.bucket_lengths = (length,)
  c.train.batch_size = batch
  c.checkpoint.async_save = False
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  c.lock()
  return c


def _synthetic(batch: int, length: int, seed: int = 0) -> Encoded:
  """Full-length random token ids: every batch has exactly the benchmark shape."""
  rng = np.random.default_rng(seed)
  ids = [np.concatenate([[101], rng.integers(1000, 20000, length - 2), [102]]).astype(np.int32)
         for _ in range(batch)]
  return Encoded(ids, [np.zeros(length, np.int32)] * batch,
                 rng.integers(0, 2, batch).astype(np.int32))


def time_method(overrides: dict, batch: int, length: int, steps: int) -> dict:
  config = _config(overrides, batch, length)
  exp = experiment.build(config, label_names=("0", "1"), read_train=False)
  data = _synthetic(batch, length)
  tx, schedule = exp.optimizer(steps + 1)
  abstract = exp.abstract_state(tx)
  trainer = exp.trainer(tx, schedule, abstract)
  state = trainer.place(exp.init_state(tx))
  batch_on_devices = trainer.device_batch(
      exp.host_batch(data, np.arange(batch), batch))
  frozen = exp.frozen()
  start = time.perf_counter()
  state, metrics = trainer.step(state, frozen, batch_on_devices)  # compile + first step
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.step(state, frozen, batch_on_devices)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as workdir:
    ckpts = Checkpoints(workdir, config.checkpoint)
    ckpts.save(1, trainer.savable(state), {"step": 1})
    ckpts.close()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(workdir)
               for f in files)
  counts = exp.param_counts()
  return {"step_s": float(np.median(times)), "step_s_all": times, "compile_s": compile_s,
          "checkpoint_bytes": size, "trainable": counts["trainable"], "total": counts["total"]}


def peft_table(results: dict) -> str:
  full = results["full"]
  lines = ["| method | trainable params | step (s) | step vs full | checkpoint (MB) | "
           "checkpoint vs full |", "|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
                 f"{r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f}x | "
                 f"{r['checkpoint_bytes'] / 1e6:.2f} | "
                 f"{100 * r['checkpoint_bytes'] / full['checkpoint_bytes']:.2f}% |")
  return "\n".join(lines)


def run() -> None:
  batch_flag = flags.DEFINE_integer("batch", 32, "Batch size.")
  length_flag = flags.DEFINE_integer("length", 64, "Sequence length (tokens).")
  steps_flag = flags.DEFINE_integer("steps", 5, "Timed steps per method (after one to compile).")
  out_flag = flags.DEFINE_string("out", None, "Write the results as JSON here.")

  def bench():
    runtime.configure_jax()
    results = {name: time_method(overrides, batch_flag.value, length_flag.value,
                                 steps_flag.value) for name, overrides in METHODS}
    print(f"train step, default model, batch {batch_flag.value} x {length_flag.value} tokens, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), median of "
          f"{steps_flag.value} steps:\n")
    print(peft_table(results))
    if out_flag.value:
      with open(out_flag.value, "w") as f:
        json.dump({"batch": batch_flag.value, "length": length_flag.value,
                   "devices": [str(d) for d in jax.devices()], "peft": results}, f, indent=2)

  runtime.run_main(bench, example="--batch=32")

if __name__ == "__main__":
  run()
