r"""Predict with a trained model:
`python -m jaxft.predict --workdir=DIR [--checkpoint=best] --input=FILE --output=FILE`
or, from a folder written by `jaxft.export --format=hf`, `--model=FOLDER` instead of `--workdir`.

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

import json
import os
from typing import Optional

import jax
import numpy as np
from absl import flags

from jaxft import runtime, tasks
from jaxft.data import encode
from jaxft.errors import fail


def _softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(tasks.log_softmax(x))


def _text(data: encode.Encoded, i: int):
  texts = [column[i] for column in data.texts]
  return texts[0] if len(texts) == 1 else texts


def entity_spans(words: list[str], tags: list[str], scores: np.ndarray) -> list[dict]:
  """Entities in seqeval's reading of BIO tags (the reading evaluation scores), with word
  offsets (end exclusive) and the mean probability of their words' tags."""
  from seqeval.metrics.sequence_labeling import get_entities
  return [{"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start:end + 1]),
           "score": round(float(np.mean(scores[start:end + 1])), 6)}
          for kind, start, end in get_entities(list(tags))]


def prediction_records(task: tasks.Task, outputs: dict, data: encode.Encoded) -> list[dict]:
  """One JSON-ready record per example (per sentence for token classification)."""
  names = task.label_names
  if task.kind == "token_classification":
    probs = data.words.sentence_predictions([_softmax(x) for x in outputs["logits"]])
    out = []
    for words, p in zip(data.words.words, probs):
      ids = p.argmax(-1)
      tags = [names[i] for i in ids]
      out.append({"words": words, "tags": tags,
                  "entities": entity_spans(words, tags, p.max(-1))})
    return out
  if task.kind == "mlm":
    fail("prediction does not apply to task.kind=mlm; export the adapted encoder "
         "(jaxft.export --format=hf) and fine-tune it on a task")
  logits = np.stack(outputs["logits"])
  out = []
  for i, row in enumerate(logits):
    record = {"text": _text(data, i)}
    if task.kind == "regression":
      record["value"] = float(row[0])
    elif task.kind == "multilabel":
      p = tasks.sigmoid(row)
      record["labels"] = [n for n, q in zip(names, p) if q > task.threshold]
      record["probabilities"] = {n: round(float(q), 6) for n, q in zip(names, p)}
    else:
      p = _softmax(row)
      record["label"] = names[int(p.argmax())]
      record["probabilities"] = {n: round(float(q), 6) for n, q in zip(names, p)}
    out.append(record)
  return out


def write_records(records: list[dict], path: str, kind: str) -> None:
  """JSONL, or TSV for a .tsv name (CoNLL-style word<TAB>tag for token classification)."""
  with open(path, "w", encoding="utf-8") as f:
    if not path.endswith(".tsv"):
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif kind == "token_classification":
      for r in records:
        f.writelines(f"{w}\t{t}\n" for w, t in zip(r["words"], r["tags"]))
        f.write("\n")
    else:
      key = {"regression": "value", "multilabel": "labels"}.get(kind, "label")
      f.write(f"text\t{key}\n")
      for r in records:
        text = r["text"] if isinstance(r["text"], str) else "\t".join(r["text"])
        value = ",".join(r[key]) if isinstance(r[key], list) else r[key]
        f.write(f"{text}\t{value}\n")


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


def load_predictor(workdir: Optional[str], model_folder: Optional[str], which: str):
  """(experiment, params): a workdir's checkpoint, or an exported Hugging Face folder."""
  from jaxft import evaluate
  if bool(workdir) == bool(model_folder):
    fail("give exactly one of --workdir (a training run) or --model (an exported folder)")
  if workdir:
    exp, _, params = evaluate.restore_for_eval(workdir, which)
    return exp, params
  return evaluate.load_exported(model_folder)


def predict(workdir: Optional[str], input_path: str, output: str, which: str = "best",
            model_folder: Optional[str] = None, input_format: Optional[str] = None) -> list:
  runtime.configure_jax()
  exp, params = load_predictor(workdir, model_folder, which)
  _check_text_fields(input_path, exp.config, input_format)
  data = encode.read_inputs(input_path, exp.config, exp.tokenizer, exp.label_names,
                            input_format)
  eval_step = exp.jit_eval_step(exp.program_cache_key("eval"))
  outputs = exp.predict_outputs(eval_step, params, data)
  records = prediction_records(exp.task, outputs, data)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_records(records, output, exp.task.kind)
    print(f"wrote {len(records)} predictions to {output}")
  return records


def run() -> None:
  """Console script `jaxft-predict` (flags defined here, not at import: see jaxft.train.run)."""
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory written by jaxft.train.")
  model_flag = flags.DEFINE_string("model", None, "Instead of --workdir: a folder written by "
                                   "jaxft.export --format=hf.")
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
