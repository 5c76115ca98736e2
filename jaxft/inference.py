"""Inference, in one place: a run's weights restored for evaluation, an exported model loaded,
and the predictor that evaluation, prediction and training's own evaluations share.

jaxft.evaluate, jaxft.predict and jaxft.export are thin entry points over this module.
Restoring reads the parameters only (never the optimizer state), onto any mesh.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft import (compiled, config as config_lib, experiment, metrics, models, parallel,
                   storage, tasks)
from jaxft.checkpoint import Checkpoints
from jaxft.data import batching, order
from jaxft.data.encode import Encoded
from jaxft.errors import UserError, fail

EXPORT_CONFIG_FILE = "jaxft_config.json"  # the run's config, beside an exported model


# ---- weights -------------------------------------------------------------------------------
def load_run_config(workdir: str):
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    fail(f"{workdir} has no config.json; is it a jaxft workdir? (train with jaxft.train first)")
  return config_lib.from_json(storage.read_text(path))


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


def restore(workdir: str, which: str = "best", devices=None, mesh: Optional[dict] = None
            ) -> tuple[experiment.Experiment, int, dict]:
  """(experiment, step, trainable params) of the chosen checkpoint of `workdir`, on this
  process's devices; evaluation always runs the jitted, sharded eval step."""
  saved = load_run_config(workdir)
  parallel.initialize_distributed(saved.parallel.distributed)
  devices = jax.devices() if devices is None else devices
  config = config_lib.replace(saved, {"parallel.mode": "jit",
                                      "parallel.mesh": _eval_mesh(saved, mesh, len(devices))})
  exp = experiment.build(config, read_train=False, devices=devices)
  ckpts = Checkpoints(workdir, config.checkpoint, read_only=True)
  step = ckpts.resolve(which)
  params, meta = ckpts.restore_params(step, exp.abstract_params())
  fingerprint = models.fingerprint(exp.model_dir)
  if meta["base_model"]["fingerprint"] != fingerprint:
    fail(f"checkpoint step {step} was trained from a different base model than "
         f"{exp.model_dir} (fingerprint {meta['base_model']['fingerprint']} vs {fingerprint})")
  return exp, step, params


def load_exported(folder: str, devices=None, mesh: Optional[dict] = None
                  ) -> tuple[experiment.Experiment, dict]:
  """(experiment, params) for a folder written by `jaxft.export --format=hf`: its weights are
  the whole model (LoRA merged, head included), so nothing is restored from a checkpoint.
  `devices` and `mesh` as for `restore`."""
  path = os.path.join(folder, EXPORT_CONFIG_FILE)
  if not os.path.exists(path):
    fail(f"{folder} is not a model exported by jaxft (no {EXPORT_CONFIG_FILE}); export one with "
         "`python -m jaxft.export --format=hf`, or pass --workdir")
  with open(path) as f:
    saved = config_lib.from_json(f.read())
  config = config_lib.replace(saved, {
      "model.name_or_path": os.path.abspath(folder),
      "peft.method": "none",  # merged weights: every parameter is simply loaded
      "parallel.mode": "jit",
      "parallel.mesh": {"data": -1, "fsdp": 1, "tensor": 1} if mesh is None else mesh})
  exp = experiment.build(config, read_train=False, devices=devices)
  return exp, jax.device_put(exp.trainable_init, exp.param_shardings())


def load(workdir: Optional[str], model_folder: Optional[str], which: str = "best"
         ) -> tuple[experiment.Experiment, dict]:
  """(experiment, params): a workdir's checkpoint, or an exported Hugging Face folder."""
  if bool(workdir) == bool(model_folder):
    fail("give exactly one of --workdir (a training run) or --model (an exported folder)")
  if workdir:
    exp, _, params = restore(workdir, which)
    return exp, params
  return load_exported(model_folder)


# ---- the predictor -------------------------------------------------------------------------
class Predictor:
  """The eval step of an experiment over whole datasets: every example scored once, outputs
  in input order. Batches are sorted by length, so they pad little and reuse the training
  shapes; every width of a dataset compiles at once before its first batch."""

  def __init__(self, exp: experiment.Experiment):
    self.exp = exp
    self.programs = compiled.eval_step(exp, exp.program_cache_key("eval"))

  def _batches(self, data: Encoded) -> tuple[list, Optional[object]]:
    """The evaluation steps of `data`: example indices sorted by length (unpacked), or packed
    placements, with their one shape."""
    c = self.exp.config
    if self.exp.packing == "off":
      return batching.eval_batches(data.lengths, c.train.eval_batch_size), None
    return order.eval_steps(data.lengths, c.train.eval_batch_size, c.data.max_seq_length,
                            parallel.batch_parallelism(self.exp.mesh), c.data.packing_length)

  def _host_batch(self, data: Encoded, chosen, shape) -> dict:
    if shape is None:
      return self.exp.host_batch(data, chosen, self.exp.config.train.eval_batch_size)
    return self.exp.host_packed_batch(data, chosen, shape)

  def first_batch_of_each_width(self, data: Encoded, planned=None) -> list[dict]:
    """The first batch (host arrays) of each shape of `data`'s evaluation: what compiling
    every evaluation shape ahead of time needs. `planned`: `_batches(data)`, if computed."""
    batches, shape = planned or self._batches(data)
    if shape is not None:
      return [self._host_batch(data, batches[0], shape)]
    maxima = [data.lengths[b].max() for b in batches]
    return [self._host_batch(data, batches[i], None)
            for i in batching.first_of_each_width(maxima, self.exp.buckets)]

  def outputs(self, params: dict, data: Encoded) -> dict[str, list]:
    """The task's eval outputs (jaxft.tasks.Task.eval_outputs) of every example of `data`, in
    input order; per-token outputs cut to each example's length (mlm: summed over it)."""
    exp, out = self.exp, {}
    frozen = exp.frozen()
    batches, shape = planned = self._batches(data)
    compiled.compile_all(self.programs.pending(self.first_batch_of_each_width(data, planned),
                                               exp.to_mesh, (params, frozen)))
    for chosen in batches:
      host = self._host_batch(data, chosen, shape)
      outputs = _to_host(self.programs(params, frozen, exp.to_mesh(host)))
      if shape is None:  # row r holds example chosen[r], from its first position
        slots = [(i, r, r, 0, data.lengths[i]) for r, i in enumerate(chosen)]
      else:
        host = _global(host)
        slots = [(host["index"][k], k, host["example_row"][k], host["example_start"][k],
                  host["example_length"][k]) for k in np.nonzero(host["index"] >= 0)[0]]
      per_token = exp.task.kind == "token_classification" or (
          exp.task.kind == "mlm" and shape is not None)
      for name, values in outputs.items():
        column = out.setdefault(name, [None] * len(data))
        for i, slot, row, start, length in slots:
          if not per_token:
            column[i] = values[slot]
          elif exp.task.kind == "mlm":  # packed: the example's share of its row, summed
            column[i] = values[row, start:start + length].sum()
          else:
            column[i] = values[row, start:start + length]
    return out

  def evaluate(self, params: dict, data: Encoded) -> dict:
    """The task's metrics of `params` on `data`."""
    return metrics.task_metrics(self.exp.task, self.outputs(params, data), data)


def _global(host_batch: dict) -> dict:
  """The global batch from this process's share (every process builds the same)."""
  if jax.process_count() == 1:
    return host_batch
  return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
          for k, v in host_batch.items()}


def _to_host(tree: dict) -> dict:
  if jax.process_count() > 1:
    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in tree.items()}
  return {k: np.asarray(v) for k, v in jax.device_get(tree).items()}


# ---- prediction records --------------------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(metrics.log_softmax(x))


def _text(data: Encoded, i: int):
  texts = [column[i] for column in data.texts]
  return texts[0] if len(texts) == 1 else texts


def entity_spans(words: list[str], tags: list[str], scores: np.ndarray) -> list[dict]:
  """Entities in seqeval's reading of BIO tags (the reading evaluation scores), with word
  offsets (end exclusive) and the mean probability of their words' tags."""
  from seqeval.metrics.sequence_labeling import get_entities
  return [{"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start:end + 1]),
           "score": round(float(np.mean(scores[start:end + 1])), 6)}
          for kind, start, end in get_entities(list(tags))]


def prediction_records(task: tasks.Task, outputs: dict, data: Encoded) -> list[dict]:
  """One JSON-ready record per example (per sentence for token classification)."""
  names = task.label_names
  if task.kind == "token_classification":
    probs = data.words.sentence_predictions([_softmax(x) for x in outputs["logits"]])
    out = []
    for words, p in zip(data.words.words, probs):
      tags = [names[i] for i in p.argmax(-1)]
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
      p = metrics.sigmoid(row)
      record["labels"] = [n for n, q in zip(names, p) if q > task.threshold]
      record["probabilities"] = {n: round(float(q), 6) for n, q in zip(names, p)}
    else:
      p = _softmax(row)
      record["label"] = names[int(p.argmax())]
      record["probabilities"] = {n: round(float(q), 6) for n, q in zip(names, p)}
    out.append(record)
  return out


def write_records(records: Sequence[dict], path: str, kind: str) -> None:
  """JSONL, or TSV for a .tsv name (CoNLL-style word<TAB>tag for token classification)."""
  with storage.open_file(path, "w") as f:
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
