r"""Evaluate a checkpoint: `python -m jaxft.evaluate --workdir=DIR [--checkpoint=best] [--split=validation]`.

Everything comes from DIR (its config.json and checkpoints): no other flags are needed. Prints the
metrics and writes DIR/eval/<split>-step<N>.json as {"step": N, "split": ..., "metrics": {...}}.

`python -m jaxft.evaluate --model=OUT/model.onnx --split_file=FILE` scores an ONNX export
(jaxft.export --format=onnx) with onnxruntime on a labelled file in the run's data format, and
prints the metrics.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m jaxft.evaluate`: start-up comes before JAX loads
  from jaxft import runtime
  runtime.start_process()

import json
import sys
from typing import Optional

import jax
from absl import flags

from jaxft import inference, metrics as metrics_lib, onnx_export, parallel, runtime, storage
from jaxft.errors import fail
from jaxft.metrics import scalars


def evaluate_checkpoint(workdir: str, which: str = "best", split: str = "validation",
                        devices=None, mesh: Optional[dict] = None) -> dict:
  runtime.configure_jax()
  exp, step, params = inference.restore(workdir, which, devices, mesh)
  data = exp.load_split(split)
  predictor = inference.Predictor(exp)
  outputs = predictor.outputs(params, data)
  result = metrics_lib.task_metrics(exp.task, outputs, data)
  examples = len(data.words.words) if data.words is not None else len(data)  # NER: sentences
  record = {"step": step, "split": split, "checkpoint": which, "metrics": result,
            "label_names": list(exp.label_names), "examples": examples}
  if jax.process_index() == 0:
    _print_metrics(f"{split} metrics of checkpoint step {step} ({which}), {examples} examples:",
                   result)
    _write_evaluation(workdir, record, exp, outputs, data)
  return record


def evaluate_onnx(model: str, split_file: str) -> dict:
  """The metrics of an ONNX export on the labelled `split_file`, printed (nothing is written:
  an export has no workdir)."""
  path = onnx_export.onnx_file(model)
  if path is None:
    fail(f"--model={model} is neither a .onnx file nor a folder holding "
         f"{onnx_export.ONNX_FILE}; evaluate a training run with --workdir=DIR")
  predictor = onnx_export.OnnxPredictor(path)
  data = predictor.read(split_file)
  result = metrics_lib.task_metrics(predictor.task, predictor.outputs(data), data)
  examples = len(data.words.words) if data.words is not None else len(data)
  _print_metrics(f"metrics of {path} on {split_file}, {examples} examples:", result)
  return {"model": path, "split_file": split_file, "metrics": result, "examples": examples}


def _print_metrics(title: str, result: dict) -> None:
  print(title)
  for name, value in scalars(result).items():
    print(f"  {name}: {value:.6f}")
  for line in _per_type_table(result.get("per_type", {})):
    print(line)


def _write_evaluation(workdir: str, record: dict, exp, outputs: dict, data) -> None:
  """eval/<split>-step<N>.json and the per-example predictions beside it. A workdir that cannot
  be written (read-only storage) only costs these files: the metrics are printed above."""
  out = storage.join(workdir, "eval", f"{record['split']}-step{record['step']}.json")
  try:
    storage.makedirs(storage.parent(out))
    storage.write_text(out, json.dumps(record, indent=2))
    if exp.task.kind != "mlm":  # per-example predictions, for error analysis
      inference.write_records(inference.prediction_records(exp.task, outputs, data),
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
  model_flag = flags.DEFINE_string("model", None, "Instead of --workdir: a model.onnx (or "
                                   "model.int8.onnx, or its folder) written by jaxft.export "
                                   "--format=onnx; needs --split_file.")
  split_file_flag = flags.DEFINE_string("split_file", None, "With --model: the labelled file to "
                                        "score, in the run's data format.")

  def main():
    if model_flag.value:
      if workdir_flag.value or not split_file_flag.value:
        fail("--model takes --split_file=FILE (a labelled file) and no --workdir; see --help")
      return evaluate_onnx(model_flag.value, split_file_flag.value)
    if not workdir_flag.value:
      fail("--workdir is required (or --model=MODEL.onnx with --split_file=FILE); see --help")
    return evaluate_checkpoint(workdir_flag.value, checkpoint_flag.value, split_flag.value,
                               mesh=parse_mesh(mesh_flag.value))

  runtime.run_main(main)

if __name__ == "__main__":
  run()
