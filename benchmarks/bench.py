r"""Benchmarks: `python benchmarks/bench.py` (speed, the default) and `--suite=peft`.

Runs from a source checkout with jaxft installed (launch/setup.sh); measurements go to
benchmarks/README.md.

Speed (one command, one run; ratios against baselines measured in the same run):
1. the machine's fp32 matmul peak (a jitted 2048^3 matmul, best of 10, before and after the
   fixed-shape steps: the higher counts);
2. a fixed-shape train step (default model, `--batch` x `--length`, HF classification head) of
   jaxft against the plain-jit Hugging Face Flax step and the PyTorch eager loop (when torch is
   installed), each in its own process (thread pools would compete; the baselines as their
   users' scripts run, without the CPU layer that jaxft's commands start with), timed round-robin
   so that machine noise hits all alike, each timed step right after an untimed one (as in a
   training loop); model-FLOPs utilisation
   (6 x non-embedding params x tokens + attention) against the measured peak;
3. end-to-end SST-2 fine-tuning (`--train_examples` sentences, one epoch, then all dev
   sentences), each a fresh process timed from start to its final metrics: jaxft with a cold and
   then a warm compilation cache, jaxft padded statically to max_seq_length, and the Hugging Face
   PyTorch Trainer with dynamic padding (when torch is installed); with dev accuracy, compile
   count and time, padding fraction, input-wait fraction and peak host memory (max RSS).
It prints markdown tables and writes all numbers as JSON (`--out`). Run it on a quiet machine.

PEFT (`--suite=peft`): train-step time and checkpoint size of every PEFT method (METHODS)
against full fine-tuning at `--batch` x `--length` (virtual tokens included in the length).

Packing (`--suite=packing`, SST-2 files required): the useful (real) tokens per second of the
train step packed by a fixed token budget against today's bucketed step, on the same SST-2
examples in one process, steps in turns; then end to end (as 3.) each `data.packing` mode with
a cold cache, "tokens" also warm, and the Trainer.

Sweep (`--suite=sweep`, SST-2 files required): jaxft-sweep of configs/sweeps/sst2_lr_bs.py on
configs/sst2_minilm.py (`--trials`, `--workers`, pruning on), timed from start to its summary;
then the same trials' values trained one after another with jaxft-train, without pruning, as a
shell loop would; each from a fresh compilation cache. Prints both times and each trial's
metric both ways (what pruning cut short, and whether it was worse).

ONNX (`--suite=onnx`, SST-2 files required): trains configs/sst2_minilm.py on `--train_examples`
sentences (or takes the run in `--workdir`), exports it with `jaxft-export --format=onnx
--quantize=int8`, then compares on every dev sentence jaxft's predictor (in this process,
started as jaxft-predict starts, every shape compiled before timing) with onnxruntime on the
float32 and the int8 model: dev accuracy, the largest logit difference to jaxft, file size, and
latency per batch of 1 and of 32 sentences taken in file order (tokenized beforehand; each
variant times all its batches in a block, blocks in turns, ONNX_ROUNDS rounds; median ms per
batch and sentences per second).

Distillation (`--suite=distill`, SST-2 files required): a teacher (configs/sst2_minilm.py on
`--train_examples` sentences), exported; then, `--seeds` times each, 3-layer students started
from its layers 0, 2, 4 (configs/sst2_distill_minilm.py): labels only, distilled, and distilled
with `--transfer` unlabelled training sentences (those after the labelled ones). Dev accuracy
(mean and sd), training wall time, and jaxft's prediction time per 1,000 dev sentences.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and any(a in sys.argv for a in ("--worker=jaxft", "--suite=onnx",
                                                           "--suite=distill")):
  # jaxft's step runs as jaxft's commands run (jaxft.runtime.start_process: the CPU layer's
  # restart); the baselines' workers do not, as their users' scripts would not. The ONNX and
  # distillation suites' predictions run as jaxft-predict runs them (ONNX Runtime's alike).
  from jaxft import runtime
  runtime.start_process()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import baselines  # noqa: E402 - beside this file
from jaxft import compiled, config as config_lib, experiment, models, runtime  # noqa: E402
from jaxft.checkpoint import Checkpoints  # noqa: E402
from jaxft.config import base_config  # noqa: E402
from jaxft.data.encode import Encoded, with_virtual_tokens  # noqa: E402
from jaxft.errors import fail  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(os.path.dirname(HERE), "configs")


METHODS = (("full", {"peft.method": "none"}),
           ("lora r8 q,v", {"peft.method": "lora"}),
           ("lora r8 all-linear", {"peft.method": "lora", "peft.lora.targets": "all-linear"}),
           ("dora r8 all-linear", {"peft.method": "lora", "peft.lora.targets": "all-linear",
                                   "peft.lora.use_dora": True}),
           ("ia3", {"peft.method": "ia3"}),
           ("adapter houlsby", {"peft.method": "adapter"}),
           ("adapter pfeiffer", {"peft.method": "adapter", "peft.adapter.kind": "pfeiffer"}),
           ("prompt 20", {"peft.method": "prompt"}),
           ("prefix 20", {"peft.method": "prefix"}),
           ("bitfit", {"peft.method": "bitfit"}),
           ("head only", {"peft.method": "freeze"}))


def _config(overrides: dict, batch: int, length: int):
  c = base_config()
  c.model.pooling = "default"  # the HF classification head, as in the baselines
  c.data.train_file = "unused"
  c.data.max_seq_length = length
  c.data.bucket_lengths = (length,)
  c.train.batch_size = batch
  c.checkpoint.async_save = False
  c.lock()
  return config_lib.replace(c, overrides)


def _synthetic(batch: int, length: int) -> Encoded:
  """Full-length random token ids: every batch has exactly the benchmark shape."""
  ids = baselines.synthetic_ids(batch, length)
  return Encoded(list(ids), [np.zeros(length, np.int32)] * batch,
                 (np.arange(batch) % 2).astype(np.int32))


def time_method(overrides: dict, batch: int, length: int, steps: int) -> dict:
  step, exp, savable = jaxft_step(batch, length, overrides, total_steps=steps + 1)
  timed = round_robin({"method": step}, steps)["method"]
  with tempfile.TemporaryDirectory() as workdir:
    ckpts = Checkpoints(workdir, exp.config.checkpoint)
    ckpts.save(1, savable(), {"step": 1})
    ckpts.close()
    size = folder_bytes(workdir)
  counts = exp.param_counts()
  return {"step_s": timed["step_s"], "step_s_all": timed["step_s_all"],
          "compile_s": timed["first_call_s"], "checkpoint_bytes": size,
          "trainable": counts["trainable"], "total": counts["total"]}


def folder_bytes(folder: str) -> int:
  """The size on disk of every file under `folder` (a checkpoint's)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
             for f in files)


def peft_table(results: dict) -> str:
  full = results["full"]
  lines = ["| method | trainable params | step (s) | step vs full | checkpoint (MB) | "
           "checkpoint vs full |", "|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
                 f"{r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f}x | "
                 f"{r['checkpoint_bytes'] / 1e6:.2f} | "
                 f"{100 * r['checkpoint_bytes'] / full['checkpoint_bytes']:.2f}% |")
  return "\n".join(lines)


# ---- speed: matmul peak, fixed-shape step --------------------------------------------------------
def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
  """The best fp32 matmul rate of this backend (GFLOP/s): the yardstick for utilisation."""
  import jax.numpy as jnp
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
  jax.block_until_ready(matmul(a, a))
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def train_flops(hf_config, non_embedding_params: int, batch: int, length: int) -> float:
  """Model FLOPs of one train step: 6 per parameter per token (forward 2, backward 4) plus the
  attention scores and mixing (2 matmuls of length^2 x hidden per layer, x3 for the backward)."""
  tokens = batch * length
  attention = 12 * hf_config.num_hidden_layers * hf_config.hidden_size * length * tokens
  return 6.0 * non_embedding_params * tokens + attention


def _non_embedding_params(params: dict) -> int:
  from flax import traverse_util
  return sum(int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(params).items()
             if "embeddings" not in k)


def jaxft_step(batch: int, length: int, overrides: Optional[dict] = None,
               total_steps: int = 10_000):
  """() -> one jaxft train step (synchronised) at this fixed shape; the experiment; and
  () -> the current state as saved in checkpoints."""
  config = _config(overrides or {"peft.method": "none"}, batch, length)
  exp = experiment.build(config, label_names=("0", "1"), read_train=False)
  tx, learning_rate = exp.optimizer(total_steps)
  train_step = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
  state = [train_step.place(exp.init_state(tx))]
  # Prompt and prefix tuning's virtual tokens take their places within the length.
  count, before = config_lib.virtual_tokens(config.peft)
  data = with_virtual_tokens(_synthetic(batch, length - count), count, before)
  device_batch = train_step.device_batch(exp.host_batch(data, np.arange(batch), batch))
  frozen = exp.frozen()

  def step():
    state[0], metrics = train_step(state[0], frozen, device_batch)
    jax.block_until_ready(metrics)

  return step, exp, lambda: train_step.savable(state[0])


def round_robin(steps: dict, rounds: int, settle: int = 0) -> dict:
  """Median seconds per call of each step function, timed in turns (first call: compile).

  Each turn first makes `settle` untimed calls, then times one: a training loop runs its steps
  back to back, and on this project's 2-core machine the first jax step after another
  process's turn ran 0.5-1 s slower (2.9 s against 1.8 s at 32 x 128), whether the turns were
  separated by 0.5 s or 3 s of idle time; whichever framework came after PyTorch paid it."""
  first, times = {}, {name: [] for name in steps}
  for name, step in steps.items():
    start = time.perf_counter()
    step()
    first[name] = time.perf_counter() - start
  for _ in range(rounds):
    for name, step in steps.items():
      for _ in range(settle):
        step()
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: {"step_s": float(np.median(t)), "step_s_all": t, "first_call_s": first[name]}
          for name, t in times.items()}


STEP_KINDS = ("jaxft", "plain jit (HF Flax + optax)", "PyTorch eager")


def make_step(kind: str, batch: int, length: int):
  """() -> one synchronised train step of `kind` (see STEP_KINDS); and what the step reports
  about itself (jaxft: the model FLOPs of the step)."""
  model_dir = models.resolve_model_dir("minilm")
  if kind == "jaxft":
    step, exp, _ = jaxft_step(batch, length)
    return step, {"train_flops": train_flops(
        exp.model.hf_config, _non_embedding_params(exp.trainable_init), batch, length),
        "attention": exp.model.attention, "scratch_buffers_kept": _scratch_buffers_kept()}
  if kind == "plain jit (HF Flax + optax)":
    return baselines.plain_flax_step(model_dir, batch, length), {}
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  return baselines.torch_eager_step(model_dir, batch, length), {}


def _scratch_buffers_kept() -> bool:
  """Whether this process runs with the CPU layer's scratch-buffer cache (jaxft.cpu)."""
  try:
    from jaxft.cpu import process
  except ImportError:
    return False
  return any("scratch_buffers" in p for p in process.loaded_libraries())


_WORKER_MARK = "jaxft.bench worker: "  # marks the protocol's lines among any other output


def serve_steps(kinds: list[str], batch: int, length: int) -> None:
  """The worker side of StepProcess: one JSON line when ready (what each step reports about
  itself), then for each input line "<index>" one step of kinds[index] and a line "done"."""
  built = [make_step(kind, batch, length) for kind in kinds]
  print(_WORKER_MARK + json.dumps([info for _, info in built]), flush=True)
  for line in sys.stdin:
    built[int(line)][0]()
    print(_WORKER_MARK + "done", flush=True)


class StepProcess:
  """Train steps run in their own process and called like functions.

  Each kind of step gets a process of its own: in one process, PyTorch's OpenMP threads and
  XLA's pool competed for the cores and slowed the jax steps, and a baseline should run as its
  users' own script would: only jaxft's worker starts with the CPU layer (see the top).
  """

  def __init__(self, kinds: list[str], batch: int, length: int):
    torch = "PyTorch eager" in kinds
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={','.join(kinds)}",
         f"--batch={batch}", f"--length={length}"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "USE_TORCH": "1" if torch else "0"})
    infos = json.loads(self._readline())
    self.steps = {kind: (lambda i=i: self._step(i)) for i, kind in enumerate(kinds)}
    self.infos = dict(zip(kinds, infos))

  def _readline(self) -> str:
    """The next protocol line of the worker (other output, e.g. warnings, passes through)."""
    for line in self._proc.stdout:
      if line.startswith(_WORKER_MARK):
        return line[len(_WORKER_MARK):]
      sys.stdout.write(line)
    raise RuntimeError(f"the benchmark worker exited with status {self._proc.wait()}")

  def _step(self, index: int) -> None:
    self._proc.stdin.write(f"{index}\n")
    self._proc.stdin.flush()
    self._readline()

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait()


def fixed_shape(batch: int, length: int, rounds: int, torch: bool) -> dict:
  peaks = [matmul_peak_gflops()]
  # one process per kind of step, loaded one after the other; the baselines as users run them
  kinds = STEP_KINDS if torch else STEP_KINDS[:2]
  workers = [StepProcess([kind], batch, length) for kind in kinds]
  try:
    results = round_robin({k: f for w in workers for k, f in w.steps.items()}, rounds, settle=1)
  finally:
    for worker in workers:
      worker.close()
  # Measured again after the steps, and the higher one counts: on this project's shared 2-core
  # machines one measurement varied from 180 to 201 GFLOP/s between runs, and a low reading
  # would flatter every step's utilisation.
  peaks.append(matmul_peak_gflops())
  peak = max(peaks)
  flops = workers[0].infos["jaxft"]["train_flops"]
  for r in results.values():
    r["tokens_per_s"] = batch * length / r["step_s"]
    r["mfu"] = flops / r["step_s"] / (peak * 1e9)
  return {"batch": batch, "length": length, "matmul_peak_gflops": peak,
          "matmul_peak_gflops_all": peaks, "train_flops": flops,
          "jaxft_attention": workers[0].infos["jaxft"]["attention"],
          "jaxft_scratch_buffers_kept": workers[0].infos["jaxft"]["scratch_buffers_kept"],
          "steps": results}


def _readings(r: dict) -> str:
  peaks = r.get("matmul_peak_gflops_all", [])
  return f" (the higher of {' and '.join(f'{p:.1f}' for p in peaks)})" if len(peaks) > 1 else ""


def fixed_shape_table(r: dict) -> str:
  base = r["steps"]["jaxft"]["step_s"]
  lines = [f"Fixed shape: batch {r['batch']} x {r['length']} tokens, median of the timed steps; "
           f"measured fp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s{_readings(r)}, "
           f"{r['train_flops'] / 1e9:.0f} GFLOP per step; jaxft's attention: "
           f"{r.get('jaxft_attention')}, scratch buffers kept: "
           f"{'yes' if r.get('jaxft_scratch_buffers_kept') else 'no'}\n",
           "| step | s/step | tokens/s | jaxft speed-up | MFU |", "|---|---|---|---|---|"]
  for name, s in r["steps"].items():
    lines.append(f"| {name} | {s['step_s']:.2f} | {s['tokens_per_s']:.0f} | "
                 f"{s['step_s'] / base:.2f}x | {100 * s['mfu']:.0f}% |")
  return "\n".join(lines)


# ---- speed: end to end -----------------------------------------------------------------------------
def _high_water_mb(pid: int) -> float:
  """The process's peak resident memory so far (VmHWM), 0 once it has exited."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def timed_process(cmd: list[str], env: dict) -> dict:
  """Runs `cmd`: wall seconds from start to exit, peak RSS (MB) and its output.

  The peak is the child's VmHWM, sampled until it exits (getrusage's ru_maxrss of a child
  keeps the parent's high-water mark across fork and exec: here, the benchmark's own).
  """
  import threading
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  peak = [0.0]

  def sample():
    while proc.poll() is None:
      peak[0] = max(peak[0], _high_water_mb(proc.pid))
      time.sleep(0.2)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  output = proc.stdout.read()
  proc.wait()
  seconds = time.perf_counter() - start
  sampler.join()
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
  return {"wall_s": seconds, "peak_rss_mb": peak[0], "output": output}


def jaxft_e2e(name: str, data: dict, cache_dir: str, workdir: str, extra: tuple = (),
              seed: int = 0) -> dict:
  from jaxft.metrics import read_metrics
  cmd = [sys.executable, "-m", "jaxft.train", f"--config={CONFIGS_DIR}/sst2_minilm.py",
         f"--workdir={workdir}", f"--config.data.train_file={data['train_file']}",
         f"--config.data.validation_file={data['validation_file']}",
         f"--config.data.max_train_examples={data['examples']}",
         f"--config.train.batch_size={data['batch']}",
         f"--config.train.learning_rate={data['learning_rate']}",
         # The Trainer's head (BERT's pooler, then a dense layer), so that every run trains the
         # same model; the config's mean pooling is an accuracy choice, not a speed one.
         "--config.model.pooling=default", f"--config.seed={seed}", *extra]
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
  result = timed_process(cmd, env)
  records = read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  last = train[-1]
  result.update(
      name=name, accuracy=[r for r in records if r["split"] == "validation"][-1]["accuracy"],
      compiles=last["compiles"], compile_s=last["compile_seconds"],
      cache_hits=last["compile_cache_hits"],
      padding_fraction=float(np.mean([r["padding_fraction"] for r in train])),
      train_shapes=last["batch_shapes"],
      input_wait_fraction=float(np.mean([r["input_wait_fraction"] for r in train])))
  return result


def trainer_e2e(data: dict, seed: int = 0) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "baselines.py"),
         f"--model_dir={models.resolve_model_dir('minilm')}",
         f"--train_file={data['train_file']}", f"--validation_file={data['validation_file']}",
         f"--examples={data['examples']}", f"--batch={data['batch']}",
         f"--learning_rate={data['learning_rate']}", "--padding=dynamic", f"--seed={seed}"]
  result = timed_process(cmd, {**os.environ, "TOKENIZERS_PARALLELISM": "false"})
  result.update(json.loads(result["output"].strip().splitlines()[-1]),
                name="HF PyTorch Trainer (dynamic padding)")
  return result


def in_rounds(data: dict, torch: bool, repeats: int, variants) -> list[dict]:
  """`variants(tmp, r)`: round r's jaxft runs (a fresh temporary folder for all rounds); then
  the Trainer's, seed r. The median run of each variant (median_runs)."""
  rounds = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(repeats):
      runs = variants(tmp, r)
      if torch:
        runs.append(trainer_e2e(data, seed=r))
      for run in runs:
        del run["output"]
      rounds.append(runs)
  return median_runs(rounds)


def end_to_end(data: dict, torch: bool, repeats: int = 1) -> list[dict]:
  """Each variant `repeats` times, in turns (a cold run gets a fresh cache every time); the
  run of median wall time stands for its variant: one run on a 2-core machine varied by 10%.
  Round r trains every variant with seed r (head, dropout, data order): one seed's dev accuracy
  on SST-2's 872 sentences moves by 1-2 points, so accuracies are compared as means."""
  def variants(tmp, r):
    cache = os.path.join(tmp, f"xla_cache{r}")
    return [jaxft_e2e("jaxft, cold compilation cache", data, cache, f"{tmp}/cold{r}", seed=r),
            jaxft_e2e("jaxft, warm compilation cache", data, cache, f"{tmp}/warm{r}", seed=r),
            jaxft_e2e("jaxft padded to 128 (static), cold cache", data,
                      os.path.join(tmp, f"xla_cache_static{r}"), f"{tmp}/static{r}",
                      ("--config.data.bucket_lengths=(128,)", "--config.data.packing=off"),
                      seed=r)]
  return in_rounds(data, torch, repeats, variants)


def median_runs(rounds: list[list[dict]]) -> list[dict]:
  """Per variant (by name, in the order of the first round), the run of median wall time (the
  lower middle one of an even count), with every run's wall time in `wall_s_all`, every run's
  dev accuracy in `accuracy_all` and their mean in `accuracy_mean`."""
  by_name: dict[str, list[dict]] = {}
  for runs in rounds:
    for run in runs:
      by_name.setdefault(run["name"], []).append(run)
  chosen = []
  for runs in by_name.values():
    ordered = sorted(runs, key=lambda run: run["wall_s"])
    accuracies = [run["accuracy"] for run in runs if "accuracy" in run]
    mean = {"accuracy_all": accuracies,
            "accuracy_mean": float(np.mean(accuracies))} if accuracies else {}
    chosen.append({**ordered[(len(ordered) - 1) // 2],
                   "wall_s_all": [run["wall_s"] for run in runs], **mean})
  return chosen


def end_to_end_table(runs: list[dict], data: dict) -> str:
  by = {r["name"]: r for r in runs}
  static = by["jaxft padded to 128 (static), cold cache"]["wall_s"]
  trainer = by.get("HF PyTorch Trainer (dynamic padding)", {}).get("wall_s")
  repeats = len(runs[0].get("wall_s_all", [None]))
  median = (f" (median of {repeats} runs each, seeds 0-{repeats - 1}; dev accuracy: their mean)"
            if repeats > 1 else "")
  lines = [f"End to end: SST-2, {data['examples']} training sentences, batch {data['batch']}, lr "
           f"{data['learning_rate']}, one epoch, then the {data['validation_file']} sentences; "
           f"process start to final metrics{median}\n",
           "| run | wall (s) | speed-up vs static 128 | vs PyTorch Trainer | dev accuracy | "
           "compiles (cache hits) | compile (s) | padding | input wait | peak RSS (MB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    vs_trainer = f"{trainer / r['wall_s']:.2f}x" if trainer else "n/a"
    compiled = (f"{r['compiles']} ({r['cache_hits']}) | {r['compile_s']:.1f} | "
                f"{100 * r['padding_fraction']:.0f}% | {100 * r['input_wait_fraction']:.1f}%"
                if "compiles" in r else "n/a | n/a | n/a | n/a")
    lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {static / r['wall_s']:.2f}x | "
                 f"{vs_trainer} | {r.get('accuracy_mean', r['accuracy']):.4f} | {compiled} | "
                 f"{r['peak_rss_mb']:.0f} |")
  return "\n".join(lines)


PACKING_RUNS = (("tokens", "cold"), ("tokens", "warm"), ("examples", "cold"), ("off", "cold"))


def packed_step_throughput(data: dict) -> dict:
  """Real tokens per second of the train step, bucketed ("off") against packed ("tokens"),
  over a whole epoch of each (the same examples; every shape compiled and run once before),
  timed in turns step by step."""
  from jaxft import config as config_lib
  from jaxft.train import _first_batches_of_each_shape, _host_train_batch
  runners = {}
  for mode in ("off", "tokens"):
    config = config_lib.replace(config_lib.load_config_file(f"{CONFIGS_DIR}/sst2_minilm.py"), {
        "data.train_file": data["train_file"], "data.validation_file": None,
        "data.max_train_examples": data["examples"], "train.batch_size": data["batch"],
        "model.pooling": "default", "data.packing": mode})
    exp = experiment.build(config)
    order = exp.train_order(exp.train_data)
    tx, learning_rate = exp.optimizer(10_000)
    train_step = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
    state = [train_step.place(exp.init_state(tx))]
    frozen = exp.frozen()
    train_step.precompile(state[0], frozen,
                          _first_batches_of_each_shape(exp, exp.train_data, order))
    hosts = [_host_train_batch(exp, exp.train_data, order, i)
             for i in range(order.steps_in_epoch(0))]
    batches = [train_step.device_batch(h) for h in hosts]
    real = [int(np.sum(h["attention_mask"] * (h["weights"][:, None] > 0))) if mode == "off"
            else int(np.sum(h["segment_ids"] > 0)) for h in hosts]

    def run(i, train_step=train_step, state=state, frozen=frozen, batches=batches):
      state[0], metrics = train_step(state[0], frozen, batches[i])
      jax.block_until_ready(metrics)

    for shape in {h["input_ids"].shape: i for i, h in enumerate(hosts)}.values():
      run(shape)  # every shape ran once before timing
    runners[mode] = (run, real, hosts)
  seconds = {mode: 0.0 for mode in runners}
  for i in range(max(len(hosts) for _, _, hosts in runners.values())):
    for mode, (run, _, hosts) in runners.items():
      if i < len(hosts):
        start = time.perf_counter()
        run(i)
        seconds[mode] += time.perf_counter() - start
  out = {}
  for mode, (_, real, hosts) in runners.items():
    padded = sum(h["input_ids"].size for h in hosts)
    out[mode] = {"seconds": seconds[mode], "real_tokens": sum(real), "steps": len(hosts),
                 "tokens_per_s": sum(real) / seconds[mode],
                 "examples": int(sum(float(np.sum(h["weights"])) for h in hosts)),
                 "padding_fraction": 1 - sum(real) / padded,
                 "shapes": len({h["input_ids"].shape for h in hosts})}
  out["ratio"] = out["tokens"]["tokens_per_s"] / out["off"]["tokens_per_s"]
  return out


def packing_end_to_end(data: dict, torch: bool, repeats: int) -> list[dict]:
  """Each PACKING_RUNS variant (and the Trainer) `repeats` times in turns, seed r in round r."""
  def variants(tmp, r):
    return [jaxft_e2e(f"jaxft packing={mode}, {cache} cache", data,
                      os.path.join(tmp, f"xla_cache_{mode}{r}"), f"{tmp}/{mode}_{cache}{r}",
                      (f"--config.data.packing={mode}",), seed=r)
            for mode, cache in PACKING_RUNS]
  return in_rounds(data, torch, repeats, variants)


def packing_table(runs: list[dict], data: dict) -> str:
  by = {r["name"]: r for r in runs}
  trainer = by.get("HF PyTorch Trainer (dynamic padding)", {}).get("wall_s")
  lines = [f"End to end: SST-2, {data['examples']} training sentences, batch {data['batch']}, "
           "one epoch, then dev; process start to final metrics (median run; accuracy: mean of "
           "seeds)\n",
           "| run | wall (s) | vs PyTorch Trainer | dev accuracy | train shapes | compiles "
           "(cache hits) | padding |", "|---|---|---|---|---|---|---|"]
  for r in runs:
    vs = f"{trainer / r['wall_s']:.2f}x" if trainer else "n/a"
    extra = (f"{r['train_shapes']} | {r['compiles']} ({r['cache_hits']}) | "
             f"{100 * r['padding_fraction']:.1f}%" if "compiles" in r else "n/a | n/a | n/a")
    lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {vs} | "
                 f"{r.get('accuracy_mean', r['accuracy']):.4f} | {extra} |")
  return "\n".join(lines)


def sweep_against_loop(data: dict, trials: int, workers: int) -> dict:
  """jaxft-sweep, then its trials one after another without pruning (module doc)."""
  from jaxft import config as config_lib
  from jaxft.metrics import read_metrics
  from jaxft.sweep import space, study as study_lib
  base = [f"--config={CONFIGS_DIR}/sst2_minilm.py",
          f"--config.data.train_file={data['train_file']}",
          f"--config.data.validation_file={data['validation_file']}",
          f"--config.data.max_train_examples={data['examples']}"]
  sweep_file = os.path.join(CONFIGS_DIR, "sweeps", "sst2_lr_bs.py")
  root = tempfile.mkdtemp(prefix="jaxft-sweep-bench-")
  directory = os.path.join(root, "sweep")
  sweep_run = timed_process(
      [sys.executable, "-m", "jaxft.sweep", *base, f"--sweep={sweep_file}",
       f"--workdir={directory}", f"--trials={trials}", f"--workers={workers}"],
      {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "cache-sweep")})
  print(sweep_run["output"][-3000:], flush=True)
  sweep = config_lib.load_config_file(sweep_file)
  study = study_lib.load_study(directory)
  rows, loop_seconds = [], 0.0
  for t in study.get_trials(deepcopy=False):
    if t.state not in study_lib.FINISHED:
      continue
    settings = space.trial_settings(sweep, t.params)
    workdir = os.path.join(root, "loop", str(t.number))
    run = timed_process([sys.executable, "-m", "jaxft.train", *base, f"--workdir={workdir}",
                         *[f"--config.{k}={v}" for k, v in settings.items()]],
                        {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "cache-loop")})
    loop_seconds += run["wall_s"]
    unpruned = max(r["accuracy"] for r in read_metrics(workdir, "validation"))
    rows.append({"trial": t.number, "params": t.params, "state": t.state.name.lower(),
                 "evaluations": len(t.intermediate_values), "sweep_value": t.value,
                 "loop_value": unpruned, "loop_s": run["wall_s"],
                 "baseline": bool(t.user_attrs.get("baseline")),
                 "sweep_compile": _compile_stats(study_lib.trial_dir(directory, t.number)),
                 "loop_compile": _compile_stats(workdir)})
    print(f"trial {t.number} alone: accuracy {unpruned:.4f} in {run['wall_s']:.1f} s", flush=True)
  return {"sweep_s": sweep_run["wall_s"], "loop_s": loop_seconds, "trials": rows,
          "workers": workers, "speedup": loop_seconds / sweep_run["wall_s"]}


def _compile_stats(workdir: str) -> dict:
  """The run's compilations: programs, seconds, and how many were loaded from a cache."""
  from jaxft.metrics import read_metrics
  last = read_metrics(workdir, "train")[-1]
  return {"programs": last["compiles"], "seconds": last["compile_seconds"],
          "loaded": last["compile_cache_hits"]}


def sweep_table(result: dict) -> str:
  compiled_text = lambda c: f"{c['programs']} ({c['loaded']} loaded), {c['seconds']:.1f} s"
  lines = ["| trial | learning rate | batch | in the sweep | evaluations | compiled in the sweep "
           "| alone, unpruned | alone, s |", "|---|---|---|---|---|---|---|---|"]
  for r in result["trials"]:
    value = "" if r["sweep_value"] is None else f"{r['sweep_value']:.4f}"
    lines.append(f"| {r['trial']}{' (config)' if r['baseline'] else ''} | "
                 f"{r['params']['train.learning_rate']:.3g} | {r['params']['train.batch_size']} | "
                 f"{r['state']} {value} | {r['evaluations']} | "
                 f"{compiled_text(r['sweep_compile'])} | {r['loop_value']:.4f} | "
                 f"{r['loop_s']:.1f} |")
  lines.append(f"\nsweep ({result['workers']} workers, pruning): {result['sweep_s']:.0f} s; "
               f"the same trials one after another, unpruned: {result['loop_s']:.0f} s "
               f"({result['speedup']:.2f}x)")
  return "\n".join(lines)


ONNX_ROUNDS = 3  # blocks of every variant, in turns


def _examples(data: Encoded, indices) -> Encoded:
  """The examples at `indices` of `data`, inputs only (what a prediction request carries)."""
  return Encoded([data.input_ids[i] for i in indices], [data.token_type_ids[i] for i in indices])


def _batch_seconds(outputs, batches: list) -> list[float]:
  """Seconds of `outputs(batch)` for each batch, one after another."""
  seconds = []
  for batch in batches:
    start = time.perf_counter()
    outputs(batch)
    seconds.append(time.perf_counter() - start)
  return seconds


def onnx_latencies(predictors: dict, data: Encoded, batch: int) -> dict:
  """{name: {"ms", "sentences_per_s", ...}} of `predictors` ({name: outputs(data)}) on `data`
  in batches of `batch` in file order: each warmed on every batch once (jaxft compiles each
  shape), then ONNX_ROUNDS blocks in turns; the median batch and the median block count."""
  batches = [_examples(data, range(i, min(i + batch, len(data))))
             for i in range(0, len(data), batch)]
  for outputs in predictors.values():
    _batch_seconds(outputs, batches)
  times = {name: [] for name in predictors}
  for _ in range(ONNX_ROUNDS):
    for name, outputs in predictors.items():
      times[name].append(_batch_seconds(outputs, batches))
  return {name: {"ms": 1000 * float(np.median(np.concatenate(t))),
                 "sentences_per_s": len(data) / float(np.median([sum(r) for r in t])),
                 "batches": len(batches)} for name, t in times.items()}


def _train_sst2(workdir: str, data: dict, config: str = "sst2_minilm.py", extra: tuple = ()
                ) -> dict:
  """`jaxft.train` of configs/<config> on the first data["examples"] training sentences: its
  wall seconds and best dev accuracy."""
  from jaxft.metrics import read_metrics
  run = timed_process(
      [sys.executable, "-m", "jaxft.train", f"--config={CONFIGS_DIR}/{config}",
       f"--workdir={workdir}", f"--config.data.train_file={data['train_file']}",
       f"--config.data.validation_file={data['validation_file']}",
       f"--config.data.max_train_examples={data['examples']}", *extra], dict(os.environ))
  return {"wall_s": run["wall_s"],
          "accuracy": max(r["accuracy"] for r in read_metrics(workdir, "validation"))}


def onnx_suite(data: dict, workdir: Optional[str]) -> dict:
  """Train (unless `workdir`), export float32 and int8, then accuracy, logit agreement, sizes
  and latencies of jaxft's predictor and of both ONNX models (module doc)."""
  import dataclasses
  from jaxft import config as config_lib, inference, metrics as metrics_lib, onnx_export
  root = tempfile.mkdtemp(prefix="jaxft-onnx-bench-")
  out = {}
  if workdir is None:
    workdir = os.path.join(root, "run")
    out["train_s"] = _train_sst2(workdir, data)["wall_s"]
  folder = os.path.join(root, "onnx")
  exported = timed_process([sys.executable, "-m", "jaxft.export", f"--workdir={workdir}",
                            f"--output={folder}", "--format=onnx", "--quantize=int8"],
                           dict(os.environ))
  print(exported["output"].strip() + "\n", flush=True)
  out.update(workdir=workdir, export_s=exported["wall_s"])
  exp, step, params = inference.restore(workdir, "best")
  dev = exp.read(data["validation_file"])
  onnx = {name: onnx_export.OnnxPredictor(os.path.join(folder, file))
          for name, file in (("ONNX float32", onnx_export.ONNX_FILE),
                             ("ONNX int8", onnx_export.INT8_FILE))}
  jaxft_logits = inference.Predictor(exp).outputs(params, dev)["logits"]
  rows = {"jaxft": {"accuracy": metrics_lib.task_metrics(
      exp.task, {"logits": jaxft_logits}, dev)["accuracy"], "max_difference": 0.0,
      "mb": 4 * exp.param_counts()["total"] / 1e6}}
  for name, model in onnx.items():
    logits = model.outputs(dev)["logits"]
    path = os.path.join(folder, onnx_export.ONNX_FILE if "32" in name else onnx_export.INT8_FILE)
    rows[name] = {"accuracy": metrics_lib.task_metrics(exp.task, {"logits": logits}, dev)[
        "accuracy"], "max_difference": onnx_export.max_difference(jaxft_logits, logits),
        "same_predictions": onnx_export.same_predictions(exp.task, jaxft_logits, logits),
        "mb": os.path.getsize(path) / 1e6}
  # Requests of 1 and of 32 sentences; then the whole file at once, as jaxft-predict runs it
  # (batches of train.eval_batch_size sorted by length, which pads little).
  for key, batch in (("batch1", 1), ("batch32", 32), ("file", len(dev))):
    size = min(batch, exp.config.train.eval_batch_size)
    sized = dataclasses.replace(exp, config=config_lib.replace(
        exp.config, {"train.eval_batch_size": size}))  # the same params, batches of `size`
    predictors = {"jaxft": lambda d, p=inference.Predictor(sized): p.outputs(params, d)}
    predictors.update({name: model.outputs for name, model in onnx.items()})
    for name, timing in onnx_latencies(predictors, dev, batch).items():
      rows[name][key] = timing
  out.update(step=step, examples=len(dev), rows=rows, packing=exp.packing,
             attention=exp.model.attention)
  return out


def onnx_table(result: dict) -> str:
  rows = result["rows"]
  base = rows["jaxft"]
  lines = [f"SST-2 dev, {result['examples']} sentences, tokenized beforehand; batches of 1 and "
           f"32 in file order (ms: median batch), then the whole file in sorted batches; median "
           f"of {ONNX_ROUNDS} rounds (jaxft: packing={result['packing']}, attention="
           f"{result['attention']}, shapes compiled first)\n",
           "| model | dev accuracy | max abs logit diff vs jaxft | size (MB) | batch 1: ms | "
           "sentences/s | vs jaxft | batch 32: ms | sentences/s | vs jaxft | whole file: "
           "sentences/s | vs jaxft |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    cells = [name, f"{r['accuracy']:.4f}",
             "-" if name == "jaxft" else f"{r['max_difference']:.1e}", f"{r['mb']:.1f}"]
    for key in ("batch1", "batch32", "file"):
      cells += [f"{r[key]['ms']:.2f}"] if key != "file" else []
      cells += [f"{r[key]['sentences_per_s']:.0f}",
                f"{r[key]['sentences_per_s'] / base[key]['sentences_per_s']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def native_builds() -> dict:
  """Each of the CPU layer's C++ libraries (jaxft.cpu.native): the seconds its build took here,
  0.0 when it was built already, or why it cannot be. Built before any timed run, as setup.sh
  does: like installing, it happens once per machine, and no run here pays for it."""
  try:
    from jaxft.cpu import native
  except ImportError:
    return {"cpu layer": "not installed"}
  builds = {}
  for name in native.LIBRARIES:
    start = time.perf_counter()
    try:
      native.build(name)
      seconds = time.perf_counter() - start
      builds[name] = round(seconds, 1) if seconds > 0.5 else 0.0
    except native.BuildError as e:
      builds[name] = f"not built: {e}"
  return builds


def _torch_installed() -> bool:
  import importlib.util
  return importlib.util.find_spec("torch") is not None


# ---- distillation -----------------------------------------------------------------------------
def _write_transfer_file(data: dict, count: int, path: str) -> str:
  """The `count` training sentences after the labelled ones, without their labels."""
  from jaxft.data import files
  sentences = files.read_columns(data["train_file"], "tsv", has_header=True,
                                 max_rows=data["examples"] + count)["sentence"]
  with open(path, "w", encoding="utf-8") as f:
    f.write("sentence\n")
    f.writelines(f"{s}\n" for s in sentences[data["examples"]:])
  return path


def predict_seconds_per_1000(workdirs: dict, rounds: int = 5) -> dict:
  """{name: median seconds per 1,000 dev sentences} of jaxft's predictor for each run of
  `workdirs` ({name: workdir}): every model compiled and warmed first, then timed in turns
  over the whole dev file, `rounds` times, so that machine noise hits all alike."""
  from jaxft import inference
  runs = {}
  for name, workdir in workdirs.items():
    exp, _, params = inference.restore(workdir, "best")
    dev, predictor = exp.load_split("validation"), inference.Predictor(exp)
    predictor.outputs(params, dev)
    runs[name] = (predictor, params, dev)
  seconds = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (predictor, params, dev) in runs.items():
      start = time.perf_counter()
      predictor.outputs(params, dev)
      seconds[name].append(time.perf_counter() - start)
  return {name: 1000 * float(np.median(seconds[name])) / len(runs[name][2]) for name in runs}


def distill_suite(data: dict, seeds: int, transfer: int) -> dict:
  """A teacher (configs/sst2_minilm.py), then per seed three 3-layer students started from its
  layers 0, 2, 4 (configs/sst2_distill_minilm.py): labels only, distilled, and distilled with
  `transfer` unlabelled training sentences; accuracies, train and predict times."""
  root = tempfile.mkdtemp(prefix="jaxft-distill-bench-")
  teacher_dir, teacher_hf = os.path.join(root, "teacher"), os.path.join(root, "teacher_hf")
  rows = {"teacher": {"runs": [_train_sst2(teacher_dir, data)], "layers": 6}}
  timed_process([sys.executable, "-m", "jaxft.export", f"--workdir={teacher_dir}",
                 f"--output={teacher_hf}"], dict(os.environ))
  unlabelled = _write_transfer_file(data, transfer, os.path.join(root, "transfer.tsv"))
  student = (f"--config.model.name_or_path={teacher_hf}",)
  distilled = (*student, f"--config.train.distill.teacher={teacher_hf}")
  variants = {"student, labels only": student, "student distilled": distilled,
              f"distilled + {transfer:,} unlabelled": (
                  *distilled, f"--config.train.distill.transfer_file={unlabelled}",
                  f"--config.train.distill.max_transfer_examples={transfer}")}
  for name, extra in variants.items():
    runs = [_train_sst2(os.path.join(root, f"{name}-{seed}".replace(" ", "_")), data,
                        "sst2_distill_minilm.py", (*extra, f"--config.seed={seed}"))
            for seed in range(seeds)]
    rows[name] = {"runs": runs, "layers": 3}
    print(name, [round(r["accuracy"], 4) for r in runs], flush=True)
  for name, row in rows.items():
    accuracies = [r["accuracy"] for r in row["runs"]]
    row.update(accuracy=float(np.mean(accuracies)), accuracy_sd=float(np.std(accuracies)),
               train_s=float(np.mean([r["wall_s"] for r in row["runs"]])))
  predict = predict_seconds_per_1000({"teacher": teacher_dir, **{
      name: os.path.join(root, f"{name}-0".replace(" ", "_")) for name in variants}})
  for name, seconds in predict.items():
    rows[name]["predict_s"] = seconds
  return {"rows": rows, "seeds": seeds, "examples": data["examples"], "transfer": transfer}


def distill_table(result: dict) -> str:
  rows = result["rows"]
  teacher = rows["teacher"]
  lines = [f"SST-2, {result['examples']:,} labelled sentences, 1 epoch; students: mean (sd) of "
           f"{result['seeds']} seeds, the teacher: seed 0; predict: jaxft's predictor on the dev "
           "sentences, compiled and warmed first\n",
           "| model | layers | dev accuracy | vs teacher | train, s | predict, s per 1,000 "
           "sentences | speed vs teacher |", "|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['layers']} | {r['accuracy']:.4f} ({r['accuracy_sd']:.4f}) | "
                 f"{100 * (r['accuracy'] - teacher['accuracy']):+.2f} pts | {r['train_s']:.0f} | "
                 f"{r['predict_s']:.2f} | {teacher['predict_s'] / r['predict_s']:.2f}x |")
  return "\n".join(lines)


def run() -> None:
  suite_flag = flags.DEFINE_enum("suite", "speed", ["speed", "peft", "packing", "sweep", "onnx",
                                                    "distill"],
                                  "Which benchmark to run.")
  batch_flag = flags.DEFINE_integer("batch", 32, "Batch size of the fixed-shape steps.")
  length_flag = flags.DEFINE_integer("length", 128, "Sequence length of the fixed-shape steps.")
  steps_flag = flags.DEFINE_integer("steps", 5, "Timed steps per variant (after one to compile).")
  train_flag = flags.DEFINE_string(
      "train_file", None, "SST-2 train.tsv for the end-to-end runs (e.g. "
      "../shared/data/sst2/train.tsv); without it only the fixed-shape part runs.")
  dev_flag = flags.DEFINE_string("validation_file", None, "SST-2 dev.tsv for the end-to-end runs.")
  examples_flag = flags.DEFINE_integer("train_examples", 2000, "Training sentences end to end.")
  repeats_flag = flags.DEFINE_integer("repeats", 1, "Runs of each end-to-end variant, round r "
                                      "with seed r (the median wall time and the mean dev "
                                      "accuracy count).")
  torch_flag = flags.DEFINE_bool("torch", True, "Include the PyTorch baselines (if installed).")
  out_flag = flags.DEFINE_string("out", None, "Write the results as JSON here.")
  trials_flag = flags.DEFINE_integer("trials", 12, "--suite=sweep: trials of the sweep.")
  workers_flag = flags.DEFINE_integer("workers", 2, "--suite=sweep: its worker processes.")
  workdir_flag = flags.DEFINE_string("workdir", None, "--suite=onnx: an SST-2 run of "
                                     "configs/sst2_minilm.py to export instead of training one.")
  seeds_flag = flags.DEFINE_integer("seeds", 3, "--suite=distill: seeds of each student.")
  transfer_flag = flags.DEFINE_integer("transfer", 10000, "--suite=distill: unlabelled training "
                                       "sentences (those after the labelled ones).")
  worker_flag = flags.DEFINE_list("worker", None, "Internal: serve these kinds of train step "
                                  f"({', '.join(STEP_KINDS)}) to the benchmark process.")

  def bench():
    runtime.configure_jax()
    if worker_flag.value:
      return serve_steps(worker_flag.value, batch_flag.value, length_flag.value)
    batch, length, steps = batch_flag.value, length_flag.value, steps_flag.value
    out = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
           "native": native_builds()}
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{os.cpu_count()} CPU cores; jaxft's C++ (built once per machine, before the runs): "
          f"{out['native']}\n", flush=True)
    data = {"train_file": train_flag.value, "validation_file": dev_flag.value,
            "examples": examples_flag.value}
    if suite_flag.value == "peft":
      out["peft"] = {name: time_method(overrides, batch, length, steps)
                     for name, overrides in METHODS}
      print(f"train step, default model, batch {batch} x {length} tokens, median of {steps} "
            f"steps:\n\n{peft_table(out['peft'])}")
    elif suite_flag.value == "sweep":
      out["sweep"] = sweep_against_loop(data, trials_flag.value, workers_flag.value)
      print(sweep_table(out["sweep"]))
    elif suite_flag.value == "onnx":
      if not dev_flag.value or not (train_flag.value or workdir_flag.value):
        fail("--suite=onnx needs --validation_file (SST-2's dev.tsv) and --train_file, or "
             "--workdir=DIR of a run of configs/sst2_minilm.py instead of --train_file")
      out["onnx"] = onnx_suite(data, workdir_flag.value)
      print(onnx_table(out["onnx"]))
    elif suite_flag.value == "distill":
      out["distill"] = distill_suite(data, seeds_flag.value, transfer_flag.value)
      print(distill_table(out["distill"]))
    elif suite_flag.value == "packing":
      data.update(batch=32, learning_rate=1e-4)
      out["step"] = packed_step_throughput(data)
      print("train step, real tokens/s: " + ", ".join(
          f"{m} {v['tokens_per_s']:.0f} ({100 * v['padding_fraction']:.0f}% padding, "
          f"{v['shapes']} shapes)" for m, v in out["step"].items() if m != "ratio") +
          f"; packed/bucketed {out['step']['ratio']:.2f}x\n", flush=True)
      torch = torch_flag.value and _torch_installed()
      out["end_to_end"] = packing_end_to_end(data, torch, repeats_flag.value)
      print(packing_table(out["end_to_end"], data))
    else:
      torch = torch_flag.value and _torch_installed()
      out["fixed_shape"] = fixed_shape(batch, length, steps, torch)
      print(fixed_shape_table(out["fixed_shape"]) + "\n", flush=True)
      if train_flag.value and dev_flag.value:
        data.update(batch=32, learning_rate=1e-4)
        out["end_to_end"] = end_to_end(data, torch, repeats_flag.value)
        print(end_to_end_table(out["end_to_end"], data))
      else:
        print("(end-to-end runs skipped: give --train_file and --validation_file)")
    if out_flag.value:
      with open(out_flag.value, "w") as f:
        json.dump(out, f, indent=2)

  runtime.run_main(bench, example="--suite=speed", uses_torch=True)  # the PyTorch baselines

if __name__ == "__main__":
  run()
