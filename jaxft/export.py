r"""Export a checkpoint:
`python -m jaxft.export --workdir=DIR --output=OUT --format=hf|peft|onnx [--quantize=int8]`.

  hf    a merged, standalone Hugging Face model folder: config.json (with id2label), tokenizer,
        flax_model.msgpack (Flax) and model.safetensors in PyTorch layout, so that both
        FlaxAutoModelForSequenceClassification and AutoModelForSequenceClassification load it.
        LoRA, DoRA and IA3 are folded into the weights. A `model.pooling=mean` run exports its
        encoder as a base model (the mean-pooling head is not a transformers class) and the head
        as jaxft_head.safetensors.
  peft  a LoRA (or DoRA), IA3, prompt- or prefix-tuning adapter in the layout of the Hugging
        Face PEFT library: adapter_config.json and adapter_model.safetensors (PEFT's names, the
        head in modules_to_save), for `peft.PeftModel.from_pretrained(base, OUT)`. Prompt,
        prefix tuning and bottleneck adapters cannot be merged into a model: jaxft-evaluate and
        jaxft-predict use their checkpoints directly.
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
  """Frozen + trainable parameters with LoRA, DoRA and IA3 merged in (host arrays)."""
  params = jax.device_get(params)
  methods = {k: params[k] for k in peft.METHOD_KEYS if params.get(k)}
  rest = {k: v for k, v in params.items() if k not in peft.METHOD_KEYS}
  flat = traverse_util.flatten_dict(jax.device_get(exp.frozen_init))
  flat.update(traverse_util.flatten_dict(rest))
  return peft.merge(traverse_util.unflatten_dict(flat), methods, peft.settings(exp.config.peft))


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


_PEFT_FORMAT_METHODS = ("lora", "ia3", "prompt", "prefix")


def _peft_method(c) -> str:
  """The one method a --format=peft export writes; an error naming the way out otherwise."""
  methods = config_lib.peft_methods(c.peft.method)
  if len(methods) != 1 or next(iter(methods)) not in _PEFT_FORMAT_METHODS:
    instead = (" Bottleneck adapters have no PEFT format for BERT-family models: jaxft-evaluate "
               "and jaxft-predict use the checkpoint as it is." if "adapter" in methods else "")
    fail(f"--format=peft writes one of {list(_PEFT_FORMAT_METHODS)} (LoRA with DoRA too) for "
         f"the PEFT library; this run used peft.method={c.peft.method}.{instead} Use "
         "--format=hf for a merged model where it can be merged")
  if c.model.pooling != "default":
    fail("--format=peft needs the Hugging Face head (model.pooling=default); this run used "
         f"model.pooling={c.model.pooling}: export it with --format=hf")
  return next(iter(methods))


def _pytorch_module(key: tuple) -> str:
  return ".".join(str(k) for k in key)


def _lora_tensors(lora: dict) -> tuple[dict, list]:
  tensors, targets = {}, set()
  for key, value in traverse_util.flatten_dict(lora).items():
    module, leaf = _pytorch_module(key[:-1]), key[-1]
    targets.add(str(key[-2]))
    value = np.asarray(value, np.float32)
    if leaf == "magnitude":
      tensors[f"base_model.model.{module}.lora_magnitude_vector"] = value
      continue
    name = "lora_A" if leaf == "lora_a" else "lora_B"
    # PEFT stores A as (r, in) and B as (out, r): the transposes of jaxft's [in, r] and [r, out].
    tensors[f"base_model.model.{module}.{name}.weight"] = np.ascontiguousarray(value.T)
  return tensors, sorted(targets)


def _ia3_tensors(ia3: dict) -> tuple[dict, list, list]:
  """PEFT's ia3_l: (out, 1) scaling outputs, (1, in) scaling inputs (feed-forward modules)."""
  tensors, targets, feedforward = {}, [], []
  for key, value in traverse_util.flatten_dict(ia3).items():
    module = _pytorch_module(key[:-1])
    value = np.asarray(value, np.float32)
    targets.append(module)
    if key[-1] == "input_scale":
      feedforward.append(module)
      value = value[None, :]
    else:
      value = value[:, None]
    tensors[f"base_model.model.{module}.ia3_l"] = np.ascontiguousarray(value)
  return tensors, sorted(targets), sorted(feedforward)


def _prompt_learning_fields(hf_config, count: int) -> dict:
  return {"num_virtual_tokens": count, "token_dim": int(hf_config.hidden_size),
          "num_transformer_submodules": 1, "num_layers": int(hf_config.num_hidden_layers),
          "num_attention_heads": int(hf_config.num_attention_heads)}


def export_peft(exp, params: dict, output: str, base_name: Optional[str]) -> None:
  """An adapter for `peft.PeftModel.from_pretrained(base, output)`: adapter_config.json and
  adapter_model.safetensors under PEFT's names, the trained head in modules_to_save."""
  from safetensors.numpy import save_file
  c = exp.config
  method = _peft_method(c)
  params = jax.device_get(params)
  head = {k: v for k, v in params.items() if k not in peft.METHOD_KEYS}
  prompt_learning = method in ("prompt", "prefix")
  # PEFT names a prompt-learning model's head base_model.X, the others' base_model.model.X.
  head_prefix = "base_model." if prompt_learning else "base_model.model."
  tensors = {head_prefix + name: value
             for name, value in to_pytorch_names(traverse_util.flatten_dict(head)).items()}
  base = exp.model.base_prefix
  modules_to_save = sorted({str(k[0]) if k[0] != base else _pytorch_module(k[:-1])
                            for k in traverse_util.flatten_dict(head)})
  fields = {"task_type": _PEFT_TASK_TYPES.get(c.task.kind), "base_model_name_or_path": base_name,
            "modules_to_save": modules_to_save, "inference_mode": True}
  if method == "lora":
    lora_tensors, targets = _lora_tensors(params[peft.LORA_KEY])
    tensors.update(lora_tensors)
    lora = c.peft.lora
    fields.update({"peft_type": "LORA", "r": int(lora.rank), "lora_alpha": float(lora.alpha),
                   "lora_dropout": float(lora.dropout), "use_rslora": bool(lora.use_rslora),
                   "use_dora": bool(lora.use_dora), "target_modules": targets, "bias": "none",
                   "fan_in_fan_out": False, "init_lora_weights": True})
  elif method == "ia3":
    ia3_tensors, targets, feedforward = _ia3_tensors(params[peft.IA3_KEY])
    tensors.update(ia3_tensors)
    fields.update({"peft_type": "IA3", "target_modules": targets,
                   "feedforward_modules": feedforward, "fan_in_fan_out": False,
                   "init_ia3_weights": True})
  elif method == "prompt":
    embeddings = np.asarray(params[peft.PROMPT_KEY]["embeddings"], np.float32)
    tensors["prompt_embeddings"] = embeddings
    fields.update({"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
                   **_prompt_learning_fields(exp.model.hf_config, embeddings.shape[0])})
  else:  # prefix: the MLP's output is what PEFT stores (its reparameterisation is dropped)
    keys, values = (np.asarray(x, np.float32)
                    for x in peft.prefix_keys_values(params[peft.PREFIX_KEY]))
    count = keys.shape[1]
    # [count, layers, key/value, width], flattened: PEFT's past_key_values layout.
    tensors["prompt_embeddings"] = np.ascontiguousarray(
        np.stack([keys, values], axis=1).transpose(2, 0, 1, 3).reshape(count, -1))
    fields.update({"peft_type": "PREFIX_TUNING", "prefix_projection": False,
                   "encoder_hidden_size": int(exp.model.hf_config.hidden_size),
                   **_prompt_learning_fields(exp.model.hf_config, count)})
  save_file(tensors, os.path.join(output, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(output, "adapter_config.json"), "w") as f:
    json.dump(fields, f, indent=2)


def _check_mergeable(c, fmt: str) -> None:
  """hf and onnx exports fold the methods into the base weights; not every method folds."""
  methods = config_lib.peft_methods(c.peft.method)
  for key, why in peft.UNMERGEABLE.items():
    if key in methods:
      alternative = ("--format=peft (loadable by PEFT's PeftModel), or " if key in
                     _PEFT_FORMAT_METHODS else "")
      fail(f"--format={fmt} merges the method into the base model's weights, and {why} "
           f"(peft.method={c.peft.method}): use {alternative}jaxft-evaluate and "
           "jaxft-predict, which read the checkpoint as it is")


def export(workdir: str, output: str, fmt: str, which: str = "best",
           quantize: str = "none") -> int:
  if fmt not in FORMATS:
    fail(f"--format={fmt!r} is not one of {list(FORMATS)}")
  if quantize not in onnx_export.QUANTIZE:
    fail(f"--quantize={quantize!r} is not one of {list(onnx_export.QUANTIZE)}")
  if quantize != "none" and fmt != "onnx":
    fail(f"--quantize={quantize} applies to --format=onnx only; drop it, or export with "
         "--format=onnx")
  run_config = inference.load_run_config(workdir)  # what cannot work is said at once
  if fmt in ("hf", "onnx"):
    _check_mergeable(run_config, fmt)
  if fmt == "peft":
    _peft_method(run_config)
  if fmt == "onnx":
    onnx_export.check_exportable(run_config)
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
