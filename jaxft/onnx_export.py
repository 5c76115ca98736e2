"""ONNX: a run exported as `model.onnx` (float32) and `model.int8.onnx` (dynamically quantized
int8 weights), checked against jaxft's own logits, and run with onnxruntime by jaxft.predict and
jaxft.evaluate.

The path: jaxft.export writes the merged Hugging Face folder (export_hf), transformers' PyTorch
classes load it, and torch.onnx.export (the dynamo exporter) writes one graph with dynamic batch
and sequence axes: inputs input_ids, attention_mask and token_type_ids (where the model takes
them), int64; output `logits`. A `model.pooling=mean` run gets the masked mean and the dense head
of jaxft.models.Model._logits around the encoder.

torch, onnx, onnxscript and onnxruntime are imported inside the functions that need them:
exporting needs all four, predicting only onnxruntime, and importing jaxft needs none.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from jaxft import config as config_lib, inference, models, storage, tasks
from jaxft.data import batching, encode
from jaxft.data.encode import Encoded
from jaxft.errors import fail

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
QUANTIZE = ("none", "int8")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_DIFFERENCE = 1e-3  # the export fails when its logits stray further from jaxft's
CHECK_EXAMPLES = 64  # examples of the run's own data the export is checked on
CHECK_BATCH = 8  # several batches of different widths, each padded to its longest example
_HF_WEIGHTS = ("flax_model.msgpack", "model.safetensors", models.MEAN_POOLING_HEAD_FILE)
# Checked on when the run's data files are not on this machine: lengths from 2 to past
# data.max_seq_length, so truncation and the longest shape are exercised too.
SAMPLE_TEXTS = ("Good.", "The plot was thin but the actors were wonderful.",
                "I would not watch it again, even for free, on a rainy Sunday afternoon.",
                "A dull, slow and joyless film", "Paris in the spring with Marie Curie",
                " ".join(["an endlessly inventive and moving story"] * 80))


# ---- what is needed ------------------------------------------------------------------------
def require(purpose: str, *packages: str) -> None:
  """A one-line error naming what to install when any of `packages` is missing."""
  missing = [p for p in packages if importlib.util.find_spec(p) is None]
  if not missing:
    return
  how = ['pip install "jaxft[onnx]"'] if set(missing) - {"torch"} else []
  if "torch" in missing:
    how.append("PyTorch (CPU is enough: pip install torch --index-url "
               "https://download.pytorch.org/whl/cpu)")
  fail(f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
       f"not installed: {' and '.join(how)}")


def check_exportable(config) -> None:
  """What ONNX export cannot do, said before anything is loaded."""
  if config.task.kind == "mlm":
    fail("--format=onnx exports task heads (classification, regression, multilabel, "
         "token_classification); task.kind=mlm is not supported: export the adapted encoder "
         "with --format=hf and fine-tune it on a task")


def onnx_file(path: str) -> Optional[str]:
  """The ONNX model `path` names: a .onnx file, or a folder holding model.onnx; None for any
  other folder (a --format=hf export)."""
  if path.endswith(".onnx"):
    if not os.path.isfile(path):
      fail(f"--model={path} does not exist; give the model.onnx or model.int8.onnx that "
           "jaxft.export --format=onnx wrote, or its folder")
    return path
  candidate = os.path.join(path, ONNX_FILE)
  return candidate if os.path.isfile(candidate) else None


# ---- export --------------------------------------------------------------------------------
def _logits_module(model, head: Optional[dict], token_types: bool):
  """A torch module (input_ids, attention_mask[, token_type_ids]) -> logits: the Hugging Face
  model's own head, or with `head` ({"weight", "bias"}) jaxft's mean pooling and dense head."""
  import torch

  class Logits(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = model
      if head is not None:
        self.weight = torch.nn.Parameter(torch.from_numpy(head["weight"]), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.from_numpy(head["bias"]), requires_grad=False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
      inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
      if token_types:
        inputs["token_type_ids"] = token_type_ids
      out = self.model(**inputs)
      if head is None:
        return out.logits.float()
      # jaxft.models.Model._logits: the mean over real tokens, then the dense layer
      mask = attention_mask.unsqueeze(-1).float()
      pooled = (out.last_hidden_state.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
      return torch.nn.functional.linear(pooled, self.weight, self.bias)

  return Logits().eval()


def torch_model(hf_folder: str, config):
  """The PyTorch model of a merged Hugging Face folder (jaxft.export.export_hf) computing
  jaxft's logits, and the names of the inputs it takes."""
  import transformers
  if not transformers.utils.is_torch_available():
    fail("transformers was loaded without PyTorch (USE_TORCH=0 in the environment?); unset "
         "USE_TORCH and run the export again")
  trust = config.model.trust_remote_code
  head = None
  if config.model.pooling == "mean":
    from safetensors.numpy import load_file
    model = transformers.AutoModel.from_pretrained(hf_folder, trust_remote_code=trust)
    tensors = load_file(os.path.join(hf_folder, models.MEAN_POOLING_HEAD_FILE))
    head = {"weight": tensors["classifier.weight"], "bias": tensors["classifier.bias"]}
  else:
    auto = (transformers.AutoModelForTokenClassification
            if config.task.kind == "token_classification"
            else transformers.AutoModelForSequenceClassification)
    model = auto.from_pretrained(hf_folder, trust_remote_code=trust)
  token_types = "token_type_ids" in inspect.signature(model.forward).parameters
  names = INPUTS if token_types else INPUTS[:2]
  return _logits_module(model.eval(), head, token_types), names


def write_onnx(module, names: tuple, path: str) -> None:
  """torch.onnx.export with the dynamo exporter: batch and sequence axes dynamic, one file
  (weights beside it only past protobuf's 2 GB)."""
  import logging
  import torch
  import warnings
  # its notes on optional torchvision operators and renamed axes say nothing about this model
  logging.getLogger("torch.onnx").setLevel(logging.ERROR)
  batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
  # 2 x 16, not 1 x 1: the exporter would take a size-1 axis for a constant.
  example = {name: torch.ones((2, 16), dtype=torch.int64) for name in names}
  weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
  with warnings.catch_warnings(), torch.no_grad():
    warnings.simplefilter("ignore")
    torch.onnx.export(module, (), path, kwargs=example, dynamo=True, verbose=False,
                      input_names=list(names), output_names=["logits"],
                      dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
                      external_data=weight_bytes > 1.8e9)


def quantize_int8(source: str, target: str) -> None:
  """Dynamic quantization: int8 weights, activations quantized per batch at run time."""
  import logging
  from onnxruntime.quantization import QuantType, quantize_dynamic
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantization
  try:
    quantize_dynamic(source, target, weight_type=QuantType.QInt8,
                     use_external_data_format=os.path.exists(source + ".data"))
  finally:
    root.setLevel(level)


def _check_data(exp) -> tuple[Encoded, str]:
  """Examples to check the export on: the first of the run's validation (else training) file
  when it is on this machine, else SAMPLE_TEXTS; and where they came from."""
  c = exp.config
  for path in (c.data.validation_file, c.data.train_file):
    if path and storage.exists(path):
      return exp.read(path, CHECK_EXAMPLES, labelled=False), path
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "samples.txt")
    fields = len(c.data.text_fields) if c.task.kind != "token_classification" else 1
    with open(path, "w") as f:  # a pair's second text: the next sample
      f.writelines("\t".join(SAMPLE_TEXTS[(i + k) % len(SAMPLE_TEXTS)] for k in range(fields))
                   + "\n" for i in range(len(SAMPLE_TEXTS)))
    return encode.read_inputs(path, c, exp.tokenizer, exp.label_names), "built-in samples"


def max_difference(a: list, b: list) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def same_predictions(task: tasks.Task, a: list, b: list) -> float:
  """The share of examples whose predictions (every token's, for token tasks) agree."""
  return float(np.mean([np.array_equal(task.predictions(np.asarray(x)),
                                       task.predictions(np.asarray(y))) for x, y in zip(a, b)]))


def _size(path: str) -> str:
  size = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
  return f"{size / 1e6:.1f} MB"


def export(exp, params: dict, hf_folder: str, output: str, quantize: str = "none") -> dict:
  """model.onnx (and with quantize=int8 model.int8.onnx) of the merged Hugging Face folder
  `hf_folder` into `output`, with its tokenizer, config.json and jaxft's config; checked
  against jaxft's logits of `params`. Returns {file name: max abs logit difference}."""
  check_exportable(exp.config)
  for name in os.listdir(hf_folder):
    if name not in _HF_WEIGHTS:
      shutil.copy(os.path.join(hf_folder, name), output)
  module, names = torch_model(hf_folder, exp.config)
  path = os.path.join(output, ONNX_FILE)
  write_onnx(module, names, path)
  files = [ONNX_FILE]
  if quantize == "int8":
    quantize_int8(path, os.path.join(output, INT8_FILE))
    files.append(INT8_FILE)
  data, source = _check_data(exp)
  expected = inference.Predictor(exp).outputs(params, data)["logits"]
  differences = {}
  for name in files:
    got = OnnxPredictor(os.path.join(output, name), CHECK_BATCH).outputs(data)["logits"]
    differences[name] = max_difference(expected, got)
    agree = ("" if exp.task.kind == "regression" else  # values: the difference says it all
             f", same predictions on {100 * same_predictions(exp.task, expected, got):.1f}%")
    print(f"  {name}: {_size(os.path.join(output, name))}, max abs logit difference to jaxft "
          f"{differences[name]:.2e} on {len(data)} examples of {source}{agree}")
  if differences[ONNX_FILE] > MAX_DIFFERENCE:
    fail(f"the exported {ONNX_FILE}'s logits differ from jaxft's by {differences[ONNX_FILE]:.2e} "
         f"(more than {MAX_DIFFERENCE}) on {source}: this model does not export faithfully "
         f"(the files are left in {output} for inspection, do not deploy them); use --format=hf")
  return differences


# ---- prediction ----------------------------------------------------------------------------
def read_export_config(folder: str):
  path = os.path.join(folder, inference.EXPORT_CONFIG_FILE)
  if not os.path.exists(path):
    fail(f"{folder} has no {inference.EXPORT_CONFIG_FILE} beside the ONNX model; use a folder "
         "written by jaxft.export --format=onnx")
  with open(path) as f:
    return config_lib.from_json(f.read())


def pad_batch(data: Encoded, chosen: np.ndarray, names: tuple) -> dict[str, np.ndarray]:
  """The examples `chosen` as int64 arrays padded to the longest of them (as
  jaxft.data.batching.make_batch pads, without its fixed widths and padding rows)."""
  width = int(data.lengths[chosen].max())
  arrays = {name: np.zeros((len(chosen), width), np.int64) for name in INPUTS}
  for row, i in enumerate(chosen):
    n = len(data.input_ids[i])
    arrays["input_ids"][row, :n] = data.input_ids[i]
    arrays["token_type_ids"][row, :n] = data.token_type_ids[i]
    arrays["attention_mask"][row, :n] = 1
  return {name: arrays[name] for name in names}


class OnnxPredictor:
  """An exported ONNX model run by onnxruntime on the CPU, with the config, tokenizer and task
  saved beside it. Examples are batched sorted by length (jaxft.data.batching.eval_batches),
  each batch padded to its longest example."""

  def __init__(self, path: str, batch_size: Optional[int] = None):
    require("running an ONNX model", "onnxruntime")
    import onnxruntime as ort
    folder = os.path.dirname(os.path.abspath(path))
    self.config = c = read_export_config(folder)
    self.tokenizer = models.load_tokenizer(folder, c.model.trust_remote_code,
                                           words_given=c.task.kind == "token_classification")
    self.task = tasks.make(c.task.kind, tuple(c.data.label_names or ()), c.task.threshold)
    self.batch_size = batch_size or c.train.eval_batch_size
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on unused initializers are noise
    try:
      self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a damaged or foreign file
      fail(f"onnxruntime cannot load {path}: {type(e).__name__}: {' '.join(str(e).split())}")
    self.names = tuple(i.name for i in self.session.get_inputs())

  def read(self, path: str) -> Encoded:
    """A labelled file in the run's data format, to evaluate on."""
    return encode.read_split(path, self.config, self.tokenizer,
                             self.task.label_names or None, None)[0]

  def outputs(self, data: Encoded) -> dict[str, list]:
    """{"logits": one array per example, in input order}: [outputs], or for token
    classification [length, outputs] cut to the example's length (as inference.Predictor)."""
    per_token = self.task.kind == "token_classification"
    logits = [None] * len(data)
    for chosen in batching.eval_batches(data.lengths, self.batch_size):
      out = self.session.run(["logits"], pad_batch(data, chosen, self.names))[0]
      for row, i in enumerate(chosen):
        logits[i] = out[row, :len(data.input_ids[i])] if per_token else out[row]
    return {"logits": logits}
