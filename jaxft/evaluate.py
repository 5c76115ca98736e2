r"""Evaluate a checkpoint: `python -m jaxft.evaluate --workdir=DIR [--checkpoint=best] [--split=validation]`.

Everything comes from DIR (its config.json and checkpoints): no other flags are needed. Prints the
metrics and writes DIR/eval/<split>-step<N>.json as {"step": N, "split": ..., "metrics": {...}}.
"""

from __future__ import annotations

import json
import os
import sys

from typing import Optional

import jax
import ml_collections
from absl import flags

from jaxft import config as config_lib, experiment, models, parallel, runtime
from jaxft.checkpoint import Checkpoints
from jaxft.metrics import scalars
from jaxft.errors import UserError, fail

def load_run_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    fail(f"{workdir} has no config.json; is it a jaxft workdir? (train with jaxft.train first)")
  with open(path) as f:
    return config_lib.from_json(f.read())


def _eval_mesh(config, mesh: Optional[dict], num_devices: int) -> dict:
  """The mesh to evaluate on: the one asked for; else the run's own if it fits these devices;
  else all devices data-parallel (a checkpoint restores onto any mesh)."""
  if mesh:
    return {**{"data": 1, "fsdp": 1, "tensor": 1}, **mesh}
  saved = dict(config.parallel.mesh)
  try:
    parallel.mesh_shape(saved, num_devices)  # the one place that knows what fits
    return saved
  except UserError:
    return {"data": -1, "fsdp": 1, "tensor": 1}


def restore_for_eval(workdir: str, which: str, devices=None, mesh: Optional[dict] = None):
  """(experiment, step, params) for the chosen checkpoint of `workdir`, on this process's mesh."""
  config = load_run_config(workdir)
  parallel.initialize_distributed(config.parallel.distributed)
  devices = jax.devices() if devices is None else devices
  with config.unlocked():
    config.parallel.mode = "jit"  # evaluation always runs the jitted, sharded eval step
    config.parallel.mesh = ml_collections.ConfigDict(_eval_mesh(config, mesh, len(devices)))
  exp = experiment.build(config, read_train=False, devices=devices)
  ckpts = Checkpoints(workdir, config.checkpoint, read_only=True)
  step = ckpts.resolve(which)
  tx, _ = exp.optimizer(1)  # only the parameters' shapes and shardings are used
  params, meta = ckpts.restore_params(step, exp.abstract_state(tx)["params"])
  fingerprint = models.fingerprint(exp.model_dir)
  if meta["base_model"]["fingerprint"] != fingerprint:
    fail(f"checkpoint step {step} was trained from a different base model than "
         f"{exp.model_dir} (fingerprint {meta['base_model']['fingerprint']} vs {fingerprint})")
  return exp, step, params


def load_exported(folder: str):
  """(experiment, params) for a folder written by `jaxft.export --format=hf`: its weights are
  the whole model (LoRA merged, head included), so nothing is restored from a checkpoint."""
  from jaxft.export import EXPORT_CONFIG_FILE
  path = os.path.join(folder, EXPORT_CONFIG_FILE)
  if not os.path.exists(path):
    fail(f"{folder} is not a model exported by jaxft (no {EXPORT_CONFIG_FILE}); export one with "
         "`python -m jaxft.export --format=hf`, or pass --workdir")
  with open(path) as f:
    config = config_lib.from_json(f.read())
  with config.unlocked():
    config.model.name_or_path = os.path.abspath(folder)
    config.peft.method = "none"  # merged weights: every parameter is simply loaded
    config.parallel.mode = "jit"
    config.parallel.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  exp = experiment.build(config, read_train=False)
  tx, _ = exp.optimizer(1)
  shardings = jax.tree_util.tree_map(lambda a: a.sharding, exp.abstract_state(tx)["params"])
  return exp, jax.device_put(exp.trainable_init, shardings)


def evaluate_checkpoint(workdir: str, which: str = "best", split: str = "validation",
                        devices=None, mesh: Optional[dict] = None) -> dict:
  runtime.configure_jax()
  exp, step, params = restore_for_eval(workdir, which, devices, mesh)
  data = exp.load_split(split)
  eval_step = exp.jit_eval_step(exp.program_cache_key("eval"))
  outputs = exp.predict_outputs(eval_step, params, data)
  result = experiment.task_metrics(exp.task, outputs, data)
  examples = len(data.words.words) if data.words is not None else len(data)  # NER: sentences
  record = {"step": step, "split": split, "checkpoint": which, "metrics": result,
            "label_names": list(exp.label_names), "examples": examples}
  if jax.process_index() == 0:
    print(f"{split} metrics of checkpoint step {step} ({which}), {examples} examples:")
    for name, value in scalars(result).items():
      print(f"  {name}: {value:.6f}")
    for line in _per_type_table(result.get("per_type", {})):
      print(line)
    _write_evaluation(workdir, record, exp, outputs, data)
  return record


def _write_evaluation(workdir: str, record: dict, exp, outputs: dict, data) -> None:
  """eval/<split>-step<N>.json and the per-example predictions beside it. A workdir that cannot
  be written (read-only storage) only costs these files: the metrics are printed above."""
  out = os.path.join(workdir, "eval", f"{record['split']}-step{record['step']}.json")
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
      json.dump(record, f, indent=2)
    if exp.task.kind != "mlm":  # per-example predictions, for error analysis
      from jaxft.predict import prediction_records, write_records
      write_records(prediction_records(exp.task, outputs, data),
                    out.replace(".json", "-predictions.jsonl"), exp.task.kind)
  except OSError as e:
    print(f"jaxft: warning: cannot write {out} ({e.strerror}); the metrics above are not "
          "saved", file=sys.stderr)
    return
  print(f"wrote {out}")


def _per_type_table(per_type: dict) -> list[str]:
  """NER: one line per entity type."""
  if not per_type:
    return []
  lines = [f"  {'type':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
  for name, r in sorted(per_type.items()):
    lines.append(f"  {name:<12}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}"
                 f"{r['support']:>9d}")
  return lines


def parse_mesh(text: Optional[str]) -> Optional[dict]:
  if not text:
    return None
  mesh = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    if name.strip() not in parallel.AXES or not size.strip().lstrip("-").isdigit():
      fail(f"--mesh={text!r}: write axis=size pairs over {list(parallel.AXES)}, e.g. data=8")
    mesh[name.strip()] = int(size)
  return mesh


def run() -> None:
  """Console script `jaxft-eval` (flags defined here, not at import: see jaxft.train.run)."""
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory written by jaxft.train.")
  checkpoint_flag = flags.DEFINE_string("checkpoint", "best",
                                        "Which checkpoint: best, latest or a step number.")
  split_flag = flags.DEFINE_string("split", "validation", "Split to evaluate: validation or "
                                   "test (the files named in the run's config), or train.")
  mesh_flag = flags.DEFINE_string("mesh", None, "Mesh to evaluate on, e.g. data=8 or "
                                  "data=2,fsdp=4 (default: the run's own if it fits these "
                                  "devices, else all devices data-parallel).")
  runtime.run_main(lambda: evaluate_checkpoint(
      workdir_flag.value, checkpoint_flag.value, split_flag.value,
      mesh=parse_mesh(mesh_flag.value)), required=("workdir",))

if __name__ == "__main__":
  run()
