"""Trains one tiny config under several device layouts; prints per-step losses as JSON.

Run as a script: it must set the CPU device count before JAX starts.
  python tests/parallel_losses.py --model=DIR --train=F --dev=F --out=OUT.json \
      --layout=one:jit:1 --layout=dp8:jit:8:data=8 --layout=pmap8:pmap:8:data=8 ...
A layout is NAME:MODE:NUM_DEVICES[:axis=size,...]; a NAME starting with a PEFT method of
PEFT_METHODS ("lora", "dora", "ia3", "adapter", "prompt", "prefix") trains it, one containing
"packed" packs its batches (by tokens, in 8 groups whatever the mesh), one
starting with "distill" trains a 1-layer student of the run of layout "one" (given first), one
starting with "contrastive" SetFit's method on 16 examples per label. With --eval_layouts,
each run's checkpoint is also evaluated on every layout given there (restore on another mesh).
"""

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from jaxft import evaluate, parallel, train  # noqa: E402
from jaxft.config import base_config, replace  # noqa: E402
from jaxft.metrics import read_metrics  # noqa: E402


# Layout name prefix -> the PEFT method's config keys (4 virtual tokens: the tiny model's
# sentences are short).
PEFT_METHODS = {"lora": {"peft.method": "lora"},
                "dora": {"peft.method": "lora", "peft.lora.use_dora": True},
                "ia3": {"peft.method": "ia3"},
                "adapter": {"peft.method": "adapter"},
                "prompt": {"peft.method": "prompt", "peft.prompt.num_virtual_tokens": 4},
                "prefix": {"peft.method": "prefix", "peft.prefix.num_virtual_tokens": 4}}


def parse_layout(text):
  name, mode, ndev, *rest = text.split(":")
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in (rest[0].split(",") if rest else []):
    axis, size = part.split("=")
    mesh[axis] = int(size)
  return name, mode, int(ndev), mesh


def tiny_config(args, mode, mesh, steps, peft_method="none", packed=False):
  c = base_config()
  c.peft.method = peft_method
  c.model.name_or_path = args.model
  c.model.pooling = "mean"
  c.data.train_file, c.data.validation_file = args.train, args.dev
  c.data.max_seq_length = 64
  # Packed layouts pack into 8 groups on every mesh, so that all see the same rows (and
  # dropout masks); the others pad.
  c.data.packing = "tokens" if packed else "off"
  c.data.packing_groups = 8 if packed else 0
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.warmup_ratio = 0.0
  c.train.num_train_steps = steps
  c.train.log_every = 1
  c.checkpoint.async_save = False
  c.parallel.mode = mode
  c.parallel.mesh.data, c.parallel.mesh.fsdp, c.parallel.mesh.tensor = (
      mesh["data"], mesh["fsdp"], mesh["tensor"])
  c.lock()
  return c


def state_bytes_per_device(state):
  """The largest number of bytes of `state` that any one device holds."""
  out = {}
  for leaf in jax.tree_util.tree_leaves(state):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return max(out.values())


def memory_report(args):
  """Per-device state bytes and one large kernel's shard shape under data=8 and data=2,fsdp=4."""
  from jaxft import experiment
  report = {}
  for name, mesh in (("data8", {"data": 8, "fsdp": 1, "tensor": 1}),
                     ("data2_fsdp4", {"data": 2, "fsdp": 4, "tensor": 1}),
                     ("data4_tensor2", {"data": 4, "fsdp": 1, "tensor": 2})):
    exp = experiment.build(tiny_config(args, "jit", mesh, 1))
    tx, _ = exp.optimizer(1)
    state = exp.init_state(tx)
    kernel = state["params"]["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    mu = state["opt_state"].inner[1].mu["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
    report[name] = {"state_bytes_per_device": state_bytes_per_device(state),
                    "kernel_shape": list(kernel.shape),
                    "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
                    "kernel_spec": str(kernel.sharding.spec),
                    "adam_mu_shard_shape": list(mu["kernel"].addressable_shards[0].data.shape)}
  return report


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model"), p.add_argument("--train"), p.add_argument("--dev")
  p.add_argument("--out"), p.add_argument("--workdir")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--layout", action="append", default=[])
  p.add_argument("--eval_layouts", action="append", default=[])
  p.add_argument("--memory", action="store_true")
  args = p.parse_args()
  results = {"memory": memory_report(args)} if args.memory else {}
  for text in args.layout:
    name, mode, ndev, mesh = parse_layout(text)
    workdir = os.path.join(args.workdir, name)
    devices = jax.devices()[:ndev]
    config = tiny_config(args, mode, mesh, args.steps, "none",
                         "packed" in name or name.startswith("contrastive"))
    config = replace(config, PEFT_METHODS.get(name.split("_")[0].replace("packed", ""), {}))
    if name.startswith("distill"):  # logits and hidden states of the teacher, on this mesh
      config = replace(config, {"train.distill.teacher": os.path.join(args.workdir, "one"),
                                "train.distill.hidden_weight": 0.5, "model.keep_layers": (1,)})
    if name.startswith("contrastive"):  # sentence pairs packed in 8 groups (jaxft.fewshot)
      config = replace(config, {"train.method": "contrastive", "data.examples_per_class": 16})
    final = train.train_and_evaluate(config, workdir, devices)
    records = read_metrics(workdir, "train")
    entry = {"losses": [r["loss"] for r in records], "accuracy": final["accuracy"],
             "compiles": [r["compiles"] for r in records],  # cumulative, this process
             "batch_shapes": records[-1]["batch_shapes"],
             "eval_steps": [r["step"] for r in read_metrics(workdir, "validation")], "evals": {}}
    for eval_text in args.eval_layouts:
      eval_name, _, eval_ndev, eval_mesh = parse_layout(eval_text)
      record = evaluate.evaluate_checkpoint(workdir, "latest", devices=jax.devices()[:eval_ndev],
                                            mesh=eval_mesh)
      entry["evals"][eval_name] = record["metrics"]
    results[name] = entry
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
