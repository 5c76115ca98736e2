r"""Predict with a trained model:
`python -m jaxft.predict --workdir=DIR [--checkpoint=best] --input=FILE --output=FILE`
or, from a folder written by `jaxft.export --format=hf`, `--model=FOLDER` instead of `--workdir`;
`--model=OUT/model.onnx` (or `OUT/model.int8.onnx`, or the folder OUT) runs a `--format=onnx`
export with onnxruntime, with the same tokenization, batching and output.

Input: plain text (.txt: one example per line, a pair's two texts tab-separated; for token
classification, words separated by spaces), a TSV/CSV/JSON/JSONL/parquet file holding the
training text fields, or CoNLL / JSON word lists (token classification).
Output (JSONL, or TSV when the name ends in .tsv), one record per example, in input order:
  classification  {"text", "label", "probabilities": {label: p}}
  regression      {"text", "value"}
  multilabel      {"text", "labels": [labels over task.threshold], "probabilities"}
  token class.    {"words", "tags", "entities": [{"type", "start", "end", "text", "score"}]}
                  (word offsets, end exclusive; score = mean tag probability of its words);
                  TSV output is CoNLL: word<TAB>tag, a blank line after each sentence.
Batched, length-bucketed and sharded like evaluation; full and PEFT checkpoints alike.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m jaxft.predict`: start-up comes before JAX loads
  from jaxft import runtime
  runtime.start_process()

import functools
from typing import Optional

import jax
from absl import flags

from jaxft import inference, onnx_export, runtime, storage
from jaxft.data import encode
from jaxft.errors import fail


def _check_text_fields(path: str, config, fmt: Optional[str]) -> None:
  """An input with columns must hold the columns the model was trained to read."""
  from jaxft.data import files
  fmt = files.infer_format(path, fmt)
  if fmt in ("text", "conll"):
    return
  d = config.data
  columns = files.read_columns(path, fmt, has_header=d.has_header, column_names=d.column_names,
                               max_rows=1)
  wanted = list(d.text_fields)
  if any(name not in columns for name in wanted):
    fail(f"--input={path} has columns {list(columns)} but the model reads {wanted} "
         f"(data.text_fields); rename the columns, or give plain text (one example per line"
         f"{', fields tab-separated' if len(wanted) > 1 else ''}) as a .txt file")


def predict(workdir: Optional[str], input_path: str, output: str, which: str = "best",
            model_folder: Optional[str] = None, input_format: Optional[str] = None) -> list:
  onnx_path = onnx_export.onnx_file(model_folder) if model_folder and not workdir else None
  if onnx_path:  # onnxruntime on this host: no JAX
    model = onnx_export.OnnxPredictor(onnx_path)
    config, tokenizer, task, outputs = model.config, model.tokenizer, model.task, model.outputs
  else:
    runtime.configure_jax()
    exp, params = inference.load(workdir, model_folder, which)
    config, tokenizer, task = exp.config, exp.tokenizer, exp.task
    outputs = functools.partial(inference.Predictor(exp).outputs, params)
  _check_text_fields(input_path, config, input_format)
  data = encode.read_inputs(input_path, config, tokenizer, task.label_names, input_format)
  records = inference.prediction_records(task, outputs(data), data)
  if onnx_path or jax.process_index() == 0:
    storage.makedirs(storage.parent(output))
    inference.write_records(records, output, task.kind)
    print(f"wrote {len(records)} predictions to {output}")
  return records


def run() -> None:
  """Console script `jaxft-predict` (flags defined here, not at import: see jaxft.train.run)."""
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory written by jaxft.train.")
  model_flag = flags.DEFINE_string("model", None, "Instead of --workdir: a folder written by "
                                   "jaxft.export --format=hf, or a model.onnx (model.int8.onnx) "
                                   "written by --format=onnx, or its folder.")
  checkpoint_flag = flags.DEFINE_string("checkpoint", "best", "With --workdir: best, latest or "
                                        "a step number.")
  input_flag = flags.DEFINE_string("input", None, "Examples to predict: .txt (one per line, "
                                   "pairs tab-separated), TSV/CSV/JSONL with the text fields, "
                                   "or CoNLL.")
  format_flag = flags.DEFINE_string("input_format", None, "Format of --input (text, tsv, csv, "
                                    "json, jsonl, parquet, conll); default: from its extension.")
  output_flag = flags.DEFINE_string("output", None, "File to write: JSONL, or TSV for a .tsv "
                                    "name (CoNLL word/tag lines for token classification).")
  runtime.run_main(lambda: predict(workdir_flag.value, input_flag.value, output_flag.value,
                                   checkpoint_flag.value, model_flag.value, format_flag.value),
                   required=("input", "output"), example="--input=FILE")

if __name__ == "__main__":
  run()
