r"""jaxft on one NVIDIA GPU, against PyTorch, in one command (launch/device_check.sh runs it).

1. BERT-base shapes (12 layers, 768 wide), random init, full fine-tuning with AdamW, at batch
   32 x 128 and 128 x 128: jaxft's train step (bfloat16 compute, platform defaults: the fused
   attention, the select guard), its tokens/s and model-FLOPs utilisation against the GPU's
   dense bf16 peak (6 x non-embedding params x tokens + attention); the same model in PyTorch
   (transformers' BertForSequenceClassification, fused AdamW, torch.autocast bf16) eager and
   under torch.compile, each in its own process, timed the same way (median of --steps).
2. The default model's shapes (6 layers, 384 wide), random init: epochs of SST-2's training
   sentences (--sst2_train) packed by tokens (jaxft's default), as `python -m jaxft.train` runs
   them: wall time from process start, the time of the second epoch, compiles and their
   seconds, and the share of the second epoch the device sat idle (a jax.profiler trace of it).
3. Which attention implementation ran (cuDNN's fused kernel or XLA's), peak device memory.

It prints one markdown table and writes device_check.json into --out. Weights are random (a
model folder is made from a config.json and the tokenizer at --tokenizer), so nothing large
has to travel. --dry_run: tiny shapes and a few steps on whatever JAX runs on (the CPU in the
tests), PyTorch eager only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Dense bfloat16 peaks (FLOP/s) by device kind, from the vendors' data sheets (without sparsity).
BF16_PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("L4", 121e12), ("A10", 125e12))
SHAPES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072),
          "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536),
          "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128)}


def bert_config(shape: str) -> dict:
  return {"vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
          "hidden_act": "gelu", "model_type": "bert", "architectures": ["BertModel"],
          **SHAPES[shape]}


def random_model_folder(shape: str, tokenizer_dir: str, out: str) -> str:
  """A model folder jaxft loads: config.json, the tokenizer, and random Flax weights."""
  from transformers import BertConfig, FlaxBertModel
  os.makedirs(out, exist_ok=True)
  FlaxBertModel(BertConfig(**bert_config(shape)), seed=0).save_pretrained(out)
  for name in os.listdir(tokenizer_dir):
    if name.startswith(("tokenizer", "vocab", "special_tokens")):
      shutil.copy(os.path.join(tokenizer_dir, name), out)
  return out


def bf16_peak(device_kind: str):
  return next((peak for kind, peak in BF16_PEAKS if kind in device_kind), None)


# ---- 1: the train step against PyTorch ---------------------------------------------------
def jaxft_step(model_dir: str, batch: int, length: int, steps: int) -> dict:
  import jax
  import bench
  from jaxft import attention
  step, exp, _ = bench.jaxft_step(batch, length, {"model.name_or_path": model_dir,
                                                  "peft.method": "none"})
  timed = bench.round_robin({"jaxft": step}, steps)["jaxft"]
  device = jax.devices()[0]
  flops = bench.train_flops(exp.model.hf_config, bench._non_embedding_params(exp.trainable_init),
                            batch, length)
  memory = (device.memory_stats() or {}).get("peak_bytes_in_use")
  return {"step_s": timed["step_s"], "first_call_s": timed["first_call_s"],
          "train_flops": flops, "compute_dtype": exp.config.train.compute_dtype,
          "attention": exp.model.attention,
          "fused_implementations": sorted(attention.fused_implementations),
          "peak_memory_bytes": memory, "device_kind": device.device_kind,
          "platform": device.platform}


def torch_step(shape: str, batch: int, length: int, steps: int, compile_: bool) -> dict:
  """PyTorch's step (run by the --torch_worker process)."""
  import numpy as np
  import torch
  from transformers import BertConfig, BertForSequenceClassification
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.manual_seed(0)
  model = BertForSequenceClassification(BertConfig(**bert_config(shape), num_labels=2)).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)
  ids = torch.as_tensor(np.random.default_rng(0).integers(1000, 20000, (batch, length)),
                        device=device)
  labels = torch.as_tensor(np.arange(batch) % 2, device=device)
  forward = torch.compile(model) if compile_ else model

  def step():
    with torch.autocast(device, dtype=torch.bfloat16):
      loss = forward(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
      torch.cuda.synchronize()

  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"step_s": float(np.median(times)), "first_call_s": first,
          "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "torch": torch.__version__}


def torch_in_own_process(shape, batch, length, steps, compile_, env) -> dict:
  result = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch_worker",
                           f"--shape={shape}", f"--batch={batch}", f"--length={length}",
                           f"--steps={steps}", *(["--compile"] if compile_ else [])],
                          capture_output=True, text=True, env=env, timeout=900)
  if result.returncode != 0:
    return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
  return json.loads(result.stdout.strip().splitlines()[-1])


# ---- 2: an SST-2 epoch ----------------------------------------------------------------------
def _device_idle_fraction(trace_dir: str):
  """The share of the traced span in which no device kernel ran (perfetto trace of the
  device's streams); None where the trace has no device stream (the CPU)."""
  paths = [os.path.join(d, f) for d, _, files in os.walk(trace_dir) for f in files
           if f.endswith(".trace.json.gz")]
  if not paths:
    return None
  with gzip.open(paths[0]) as f:
    events = json.load(f)["traceEvents"]
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
                 "process_name" and "/device:GPU" in str(e.get("args", {}).get("name"))}
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e)
  everything = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X"]
  if not spans or not everything:
    return None
  busy, end = 0.0, None
  for start, stop in spans:
    if end is None or start > end:
      busy += stop - start
      end = stop
    elif stop > end:
      busy += stop - end
      end = stop
  total = max(e for _, e in everything) - min(s for s, _ in everything)
  return max(0.0, 1.0 - busy / total) if total > 0 else None


def sst2_epochs(model_dir: str, train_file: str, dev_file: str, examples, workdir: str,
                env: dict) -> dict:
  """Epoch 1 as a fresh `python -m jaxft.train` (wall time from process start); then epoch 2
  resumed in this process under jax.profiler."""
  sys.path.insert(0, HERE)
  import bench
  from jaxft import config as config_lib, train
  from jaxft.metrics import read_metrics
  overrides = [f"--config.model.name_or_path={model_dir}", "--config.model.pooling=default",
               f"--config.data.train_file={train_file}",
               f"--config.data.validation_file={dev_file}", "--config.train.log_every=50"]
  if examples:
    overrides.append(f"--config.data.max_train_examples={examples}")
  first = bench.timed_process(
      [sys.executable, "-m", "jaxft.train", f"--config={REPO}/configs/sst2_minilm.py",
       f"--workdir={workdir}", *overrides], env)
  records = read_metrics(workdir, "train")
  config = config_lib.load_config_file(f"{REPO}/configs/sst2_minilm.py")
  with config.unlocked():
    config.model.name_or_path, config.model.pooling = model_dir, "default"
    config.data.train_file, config.data.validation_file = train_file, dev_file
    config.data.max_train_examples = examples or None
    config.train.log_every, config.train.num_epochs = 50, 2.0
  import jax
  trace = os.path.join(workdir, "trace")
  start = time.perf_counter()
  with jax.profiler.trace(trace, create_perfetto_trace=True):
    train.train_and_evaluate(config, workdir)
  second = time.perf_counter() - start
  last = read_metrics(workdir, "train")[-1]
  return {"epoch1_wall_from_process_start_s": first["wall_s"], "epoch2_s": second,
          "epoch1_compiles": records[-1]["compiles"],
          "epoch1_compile_s": records[-1]["compile_seconds"],
          "epoch2_compiles_after_resume": last["compiles"],
          "padding_fraction": records[-1]["padding_fraction"],
          "epoch2_device_idle_fraction": _device_idle_fraction(trace)}


# ---- the report ----------------------------------------------------------------------------
def table(result: dict) -> str:
  peak = result["bf16_peak_flops"]
  lines = [f"jaxft device check: {result['device_kind']} ({result['platform']}), jax "
           f"{result['jax']}, dense bf16 peak {peak / 1e12 if peak else float('nan'):.0f} "
           "TFLOP/s", "",
           "| model, batch | run | step (ms) | tokens/s | MFU | vs jaxft | peak memory (GB) |",
           "|---|---|---|---|---|---|---|"]
  for row in result["steps"]:
    base = row["jaxft"]["step_s"]
    for name in ("jaxft", "pytorch eager", "pytorch compile"):
      r = row.get(name)
      if r is None or "step_s" not in r:
        lines.append(f"| {row['name']} | {name} | {(r or {}).get('error', 'not run')} |||||")
        continue
      tokens = row["tokens"] / r["step_s"]
      mfu = row["jaxft"]["train_flops"] / r["step_s"] / peak if peak else float("nan")
      memory = r.get("peak_memory_bytes")
      lines.append(f"| {row['name']} | {name} | {1e3 * r['step_s']:.1f} | {tokens:,.0f} | "
                   f"{100 * mfu:.0f}% | {r['step_s'] / base:.2f}x | "
                   f"{memory / 1e9 if memory else float('nan'):.1f} |")
  epochs = result.get("sst2")
  if epochs:
    idle = epochs["epoch2_device_idle_fraction"]
    lines += ["", f"SST-2 ({epochs['examples']} sentences), default-model shapes: epoch 1 "
              f"{epochs['epoch1_wall_from_process_start_s']:.1f} s from process start "
              f"({epochs['epoch1_compiles']} compiles, {epochs['epoch1_compile_s']:.1f} s); "
              f"epoch 2 {epochs['epoch2_s']:.1f} s; device idle in epoch 2: "
              f"{'n/a' if idle is None else f'{100 * idle:.1f}%'}; padding "
              f"{100 * epochs['padding_fraction']:.0f}%"]
  attention = result["steps"][0]["jaxft"]
  lines += ["", f"attention: {attention['attention']} "
            f"({', '.join(attention['fused_implementations']) or 'not fused'})"]
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=".")
  p.add_argument("--tokenizer", default=None, help="folder with vocab.txt/tokenizer.json "
                 "(default: the installed default model's)")
  p.add_argument("--sst2_train", default=None)
  p.add_argument("--sst2_dev", default=None)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dry_run", action="store_true")
  p.add_argument("--torch_env", default=None, help="PYTHONPATH for the PyTorch processes "
                 "(without the transformers 4 that jaxft brings; default: as this one)")
  p.add_argument("--torch_worker", action="store_true")
  p.add_argument("--shape", default="bert-base")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--compile", action="store_true")
  args = p.parse_args()
  if args.torch_worker:
    print(json.dumps(torch_step(args.shape, args.batch, args.length, args.steps, args.compile)))
    return 0
  sys.path.insert(0, HERE)
  from jaxft import models, runtime
  import jax
  runtime.configure_jax()
  os.makedirs(args.out, exist_ok=True)
  tokenizer = args.tokenizer or models.resolve_model_dir("minilm")
  shape, steps = ("tiny", 3) if args.dry_run else ("bert-base", args.steps)
  batches = ((4, 16),) if args.dry_run else ((32, 128), (128, 128))
  torch_env = dict(os.environ, USE_TORCH="1")
  if args.torch_env is not None:
    torch_env["PYTHONPATH"] = args.torch_env
  device = jax.devices()[0]
  result = {"device_kind": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "bf16_peak_flops": bf16_peak(device.device_kind),
            "steps": []}
  with tempfile.TemporaryDirectory() as tmp:
    model = random_model_folder(shape, tokenizer, os.path.join(tmp, shape))
    for batch, length in batches:
      row = {"name": f"{shape}, {batch} x {length}", "tokens": batch * length,
             "jaxft": jaxft_step(model, batch, length, steps)}
      row["pytorch eager"] = torch_in_own_process(shape, batch, length, steps, False, torch_env)
      if not args.dry_run:
        row["pytorch compile"] = torch_in_own_process(shape, batch, length, steps, True,
                                                      torch_env)
      result["steps"].append(row)
    if args.sst2_train and args.sst2_dev:
      small = random_model_folder("tiny" if args.dry_run else "minilm", tokenizer,
                                  os.path.join(tmp, "sst2_model"))
      examples = 64 if args.dry_run else None
      result["sst2"] = sst2_epochs(small, args.sst2_train, args.sst2_dev, examples,
                                   os.path.join(tmp, "sst2_run"), dict(os.environ))
      result["sst2"]["examples"] = examples or "all"
  with open(os.path.join(args.out, "device_check.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(table(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
