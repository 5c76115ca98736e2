r"""Export a checkpoint:
`python -m jaxft.export --workdir=DIR --output=OUT --format=hf|peft|onnx [--quantize=int8]`.

  hf    a merged, standalone Hugging Face model folder: config.json (with id2label), tokenizer,
        flax_model.msgpack (Flax) and model.safetensors in PyTorch layout, so that both
        FlaxAutoModelForSequenceClassification and AutoModelForSequenceClassification load it.
        LoRA factors are folded into their kernels. A `model.pooling=mean` run exports its
        encoder as a base model (the mean-pooling head is not a transformers class) and the head
        as jaxft_head.safetensors.
  peft  a LoRA adapter in the layout of the Hugging Face PEFT library: adapter_config.json and
        adapter_model.safetensors (PyTorch names, lora_A (r, in), lora_B (out, r), the head in
        modules_to_save), for `peft.PeftModel.from_pretrained(base, OUT)`.
  onnx  model.onnx (float32; with --quantize=int8 also model.int8.onnx), the tokenizer,
        config.json and jaxft's config, for jaxft.predict --model=OUT/model.onnx or any ONNX
        runtime; checked against jaxft's logits before the command ends (jaxft.onnx_export).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import jax
import numpy as np
from absl import flags
from flax import serialization, traverse_util

from jaxft import config as config_lib, inference, models, onnx_export, peft, runtime, storage
from jaxft.errors import fail

FORMATS = ("hf", "peft", "onnx")
_PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS",
                    "multilabel": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


def to_pytorch_names(flat: dict) -> dict[str, np.ndarray]:
  """Flax parameter paths -> PyTorch state-dict names and layouts (the inverse of
  transformers' PyTorch -> Flax conversion for BERT-family models)."""
  out = {}
  for key, value in flat.items():
    value = np.asarray(value, np.float32)
    *module, leaf = [str(k) for k in key]
    if leaf == "kernel":
      name, value = "weight", value.T  # Dense: Flax [in, out], PyTorch [out, in]
    elif leaf in ("embedding", "scale"):
      name = "weight"
    else:
      name = leaf
    out[".".join(module + [name])] = np.ascontiguousarray(value)
  return out


def _full_params(exp, params: dict) -> dict:
  """Frozen + trainable parameters with any LoRA factors merged in (host arrays)."""
  params = jax.device_get(params)
  lora = params.get(peft.LORA_KEY)
  rest = {k: v for k, v in params.items() if k != peft.LORA_KEY}
  flat = traverse_util.flatten_dict(jax.device_get(exp.frozen_init))
  flat.update(traverse_util.flatten_dict(rest))
  full = traverse_util.unflatten_dict(flat)
  if lora:
    full = peft.merge_lora(full, lora, peft.lora_scale(exp.config.peft.lora))
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), full)


def export_hf(exp, params: dict, output: str) -> None:
  from safetensors.numpy import save_file
  full = _full_params(exp, params)
  exp.model.hf_config.architectures = None
  if exp.config.model.pooling == "mean":
    prefix = exp.model.base_prefix
    encoder, head = full[prefix], full["classifier"]
    save_file({"classifier.weight": np.ascontiguousarray(head["kernel"].T),
               "classifier.bias": head["bias"]},
              os.path.join(output, models.MEAN_POOLING_HEAD_FILE))
    full = encoder
  with open(os.path.join(output, "flax_model.msgpack"), "wb") as f:
    f.write(serialization.to_bytes(full))
  save_file(to_pytorch_names(traverse_util.flatten_dict(full)),
            os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
  exp.model.hf_config.save_pretrained(output)
  exp.tokenizer.save_pretrained(output)
  # The run's config, so that jaxft.predict --model=OUT knows the task, head and text fields.
  with open(os.path.join(output, inference.EXPORT_CONFIG_FILE), "w") as f:
    f.write(config_lib.to_json(exp.config))


def export_peft(exp, params: dict, output: str, base_name: Optional[str]) -> None:
  from safetensors.numpy import save_file
  c = exp.config
  if c.peft.method != "lora":
    fail(f"--format=peft exports LoRA adapters; this run used peft.method={c.peft.method}. "
         "Use --format=hf for a full model")
  if c.model.pooling != "default":
    fail("--format=peft needs the Hugging Face head (model.pooling=default); this run used "
         f"model.pooling={c.model.pooling}: export it with --format=hf")
  params = jax.device_get(params)
  tensors, targets = {}, set()
  for key, value in traverse_util.flatten_dict(params[peft.LORA_KEY]).items():
    module = ".".join(str(k) for k in key[:-1])
    targets.add(str(key[-2]))
    name = "lora_A" if key[-1] == "lora_a" else "lora_B"
    # PEFT stores A as (r, in) and B as (out, r): the transposes of jaxft's [in, r] and [r, out].
    tensors[f"base_model.model.{module}.{name}.weight"] = np.ascontiguousarray(
        np.asarray(value, np.float32).T)
  head = {k: v for k, v in params.items() if k != peft.LORA_KEY}
  modules_to_save = sorted({str(k[0]) for k in traverse_util.flatten_dict(head)})
  for name, value in to_pytorch_names(traverse_util.flatten_dict(head)).items():
    tensors[f"base_model.model.{name}"] = value
  save_file(tensors, os.path.join(output, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  lora = c.peft.lora
  adapter_config = {
      "peft_type": "LORA", "task_type": _PEFT_TASK_TYPES.get(c.task.kind), "base_model_name_or_path": base_name,
      "r": int(lora.rank), "lora_alpha": float(lora.alpha), "lora_dropout": float(lora.dropout),
      "use_rslora": bool(lora.use_rslora), "target_modules": sorted(targets),
      "modules_to_save": modules_to_save, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "init_lora_weights": True,
  }
  with open(os.path.join(output, "adapter_config.json"), "w") as f:
    json.dump(adapter_config, f, indent=2)


def export(workdir: str, output: str, fmt: str, which: str = "best",
           quantize: str = "none") -> int:
  if fmt not in FORMATS:
    fail(f"--format={fmt!r} is not one of {list(FORMATS)}")
  if quantize not in onnx_export.QUANTIZE:
    fail(f"--quantize={quantize!r} is not one of {list(onnx_export.QUANTIZE)}")
  if quantize != "none" and fmt != "onnx":
    fail(f"--quantize={quantize} applies to --format=onnx only; drop it, or export with "
         "--format=onnx")
  if fmt == "onnx":  # before the slow part: what cannot work is said at once
    onnx_export.check_exportable(inference.load_run_config(workdir))
    onnx_export.require("--format=onnx", "torch", "onnx", "onnxscript", "onnxruntime")
  runtime.configure_jax()
  exp, step, params = inference.restore(workdir, which)
  if storage.listdir(output):
    fail(f"--output={output} exists and is not empty; choose a new folder")
  with storage.local_folder(output) as folder:  # a gs:// output is written here, then copied
    if fmt == "hf":
      export_hf(exp, params, folder)
    elif fmt == "onnx":  # through the merged Hugging Face folder and its PyTorch classes
      print(f"exporting checkpoint step {step} of {workdir} as onnx:")
      with tempfile.TemporaryDirectory(prefix="jaxft-hf-") as hf_folder:
        export_hf(exp, params, hf_folder)
        onnx_export.export(exp, params, hf_folder, folder, quantize)
    else:
      export_peft(exp, params, folder, exp.model_dir)
  print(f"exported checkpoint step {step} of {workdir} as {fmt} to {output}")
  return step


def run() -> None:
  """Console script `jaxft-export`."""
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory written by jaxft.train.")
  output_flag = flags.DEFINE_string("output", None, "Folder to write (new or empty).")
  format_flag = flags.DEFINE_enum("format", "hf", list(FORMATS), "hf: merged Hugging Face "
                                  "model folder; peft: LoRA adapter for the PEFT library; onnx: "
                                  "model.onnx for onnxruntime.")
  checkpoint_flag = flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  quantize_flag = flags.DEFINE_enum("quantize", "none", list(onnx_export.QUANTIZE), "With "
                                    "--format=onnx: int8 also writes model.int8.onnx (int8 "
                                    "weights, dynamic quantization).")
  runtime.run_main(lambda: export(workdir_flag.value, output_flag.value, format_flag.value,
                                  checkpoint_flag.value, quantize_flag.value),
                   required=("workdir", "output"),
                   # --format=onnx goes through transformers' PyTorch classes
                   uses_torch=lambda: format_flag.value == "onnx")

if __name__ == "__main__":
  run()
