"""Device layouts give the same training, dropout on: 1 device, data/FSDP/tensor meshes, pmap,
2 processes.

Each check runs in a subprocess, because the number of CPU devices is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxft.metrics import read_metrics
from tests.conftest import REPO, write_config_file

LAYOUTS = ["one:jit:1", "dp8:jit:8:data=8", "dp2fsdp4:jit:8:data=2,fsdp=4",
           "dp4tp2:jit:8:data=4,tensor=2", "pmap8:pmap:8:data=8",
           "packed_one:jit:1", "packed_dp2fsdp4:jit:8:data=2,fsdp=4", "packed_pmap8:pmap:8:data=8"]
# Methods with their own step (a teacher in it, sentence pairs): `-m slow`, so that the default
# run stays under 15 minutes. Distillation's teacher is the run of layout "one".
METHOD_LAYOUTS = ["one:jit:1", "packed_one:jit:1",
                  "distill_one:jit:1", "distill_fsdp_tp:jit:8:data=2,fsdp=2,tensor=2",
                  "distill_pmap:pmap:8:data=8", "contrastive_one:jit:1",
                  "contrastive_dp2fsdp4:jit:8:data=2,fsdp=4", "contrastive_pmap8:pmap:8:data=8"]

# Every PEFT method on one device, FSDP + tensor parallel and pmap (`-m slow`); prefix tuning
# packed too (its virtual tokens within each example's segment).
PEFT_LAYOUTS = [f"{method}_{layout}" for method in ("lora", "dora", "ia3", "adapter", "prompt",
                                                    "prefix")
                for layout in ("one:jit:1", "fsdp_tp:jit:8:data=2,fsdp=2,tensor=2",
                               "pmap:pmap:8:data=8")] + [
                    "prefixpacked_one:jit:1", "prefixpacked_dp2fsdp4:jit:8:data=2,fsdp=4"]


def _max_relative_difference(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  return float(np.max(np.abs(a - b) / np.abs(a)))


def _layout_results(out, minilm_dir, sentiment_files, layouts, *extra) -> dict:
  """Every layout trains the tiny model with dropout on (0.1, hidden and attention): masks are
  a function of the global example and position, so each layout must give one device's
  losses, pmap included."""
  from conftest import make_tiny_model
  dropping = make_tiny_model(out / "tiny_dropout", minilm_dir, dropout=0.1)
  cmd = [sys.executable, os.path.join(REPO, "tests", "parallel_losses.py"),
         f"--model={dropping}", f"--train={sentiment_files[0]}",
         f"--dev={sentiment_files[1]}", f"--out={out}/results.json", f"--workdir={out}",
         "--steps=36", *[f"--layout={l}" for l in layouts], *extra]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "results.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, minilm_dir, sentiment_files):
  return _layout_results(tmp_path_factory.mktemp("layouts"), minilm_dir, sentiment_files,
                         LAYOUTS, "--memory", "--eval_layouts=e1:jit:1",
                         "--eval_layouts=e8:jit:8:data=8")


@pytest.fixture(scope="module")
def method_layout_runs(tmp_path_factory, minilm_dir, sentiment_files):
  return _layout_results(tmp_path_factory.mktemp("method_layouts"), minilm_dir,
                         sentiment_files, METHOD_LAYOUTS)


def test_every_layout_logs_the_same_losses(layout_runs):
  reference = layout_runs["one"]["losses"]
  assert len(reference) == 36
  for name in ("dp8", "dp2fsdp4", "dp4tp2", "pmap8"):
    assert _max_relative_difference(reference, layout_runs[name]["losses"]) < 1e-4, name
    assert abs(layout_runs[name]["accuracy"] - layout_runs["one"]["accuracy"]) <= 1e-3, name


def test_jit_and_pmap_compile_every_train_shape_before_the_first_step(layout_runs):
  """Training compiles nothing in the first epoch (every width is compiled before step 1) and
  nothing after the first evaluation and save (which compile their own small programs once on
  a multi-device mesh)."""
  for name in ("dp8", "pmap8"):
    run = layout_runs[name]
    assert run["batch_shapes"] >= 2, run["batch_shapes"]  # several widths to compile
    first_eval = run["eval_steps"][0]
    assert first_eval < len(run["compiles"])  # there are steps after it
    first_epoch, after = run["compiles"][:first_eval], run["compiles"][first_eval:]
    assert len(set(first_epoch)) == 1 and len(set(after)) == 1, (name, run["compiles"])


@pytest.mark.slow  # 90 s with the contrastive layouts: the default run stays under 15 minutes
def test_distillation_trains_the_same_under_every_parallel_mode(method_layout_runs):
  """The teacher's parameters take the student's mesh and rules: a sharded or pmapped teacher
  gives one device's distillation losses (logits and hidden states matched)."""
  runs = method_layout_runs
  reference = runs["distill_one"]["losses"]
  assert _max_relative_difference(reference, runs["one"]["losses"]) > 1e-3
  for name in ("distill_fsdp_tp", "distill_pmap"):
    assert _max_relative_difference(reference, runs[name]["losses"]) < 1e-4, name


def test_packed_batches_train_the_same_under_every_parallel_mode(layout_runs):
  """Packed rows (8 groups, each example inside one) split whole over devices and pmap's
  shards: the same losses as one device, dropout on, with one compiled train shape."""
  reference = layout_runs["packed_one"]["losses"]
  assert _max_relative_difference(reference, layout_runs["one"]["losses"]) > 1e-3  # packed
  for name in ("packed_dp2fsdp4", "packed_pmap8"):
    assert _max_relative_difference(reference, layout_runs[name]["losses"]) < 1e-4, name
    assert layout_runs[name]["batch_shapes"] == 1
    assert abs(layout_runs[name]["accuracy"] - layout_runs["packed_one"]["accuracy"]) <= 1e-3


@pytest.mark.slow  # shares the method layouts' runs with the test above
def test_contrastive_pairs_train_the_same_under_every_parallel_mode(method_layout_runs):
  """Packed sentence pairs split whole over devices and pmap's shards: one device's pair
  losses, and the same fitted head's accuracy."""
  runs = method_layout_runs
  reference = runs["contrastive_one"]["losses"]
  assert _max_relative_difference(reference, runs["packed_one"]["losses"]) > 1e-2
  for name in ("contrastive_dp2fsdp4", "contrastive_pmap8"):
    assert _max_relative_difference(reference, runs[name]["losses"]) < 1e-4, name
    assert runs[name]["batch_shapes"] == 1
    assert abs(runs[name]["accuracy"] - runs["contrastive_one"]["accuracy"]) <= 2e-3




def test_checkpoints_restore_on_other_meshes_with_identical_metrics(layout_runs):
  # The data=2,fsdp=4 checkpoint evaluated on 1 device and on data=8 (and so for every layout).
  for name, run in layout_runs.items():
    if name == "memory":
      continue
    for eval_name, metrics in run["evals"].items():
      assert metrics["accuracy"] == pytest.approx(run["accuracy"], abs=1e-9), (name, eval_name)
    e1, e8 = run["evals"]["e1"], run["evals"]["e8"]
    assert e1["loss"] == pytest.approx(e8["loss"], rel=1e-6)


def test_fsdp_shards_large_kernels_and_cuts_state_memory(layout_runs):
  memory = layout_runs["memory"]
  dp, fsdp, tp = memory["data8"], memory["data2_fsdp4"], memory["data4_tensor2"]
  assert dp["kernel_shard_shape"] == dp["kernel_shape"] == [32, 64]  # replicated
  assert fsdp["kernel_shard_shape"] == [8, 64] and "fsdp" in fsdp["kernel_spec"]
  assert fsdp["adam_mu_shard_shape"] == [8, 64]  # optimizer moments follow their parameter
  assert tp["kernel_shard_shape"] == [32, 32] and "tensor" in tp["kernel_spec"]
  # Almost all of the tiny model is sharded 4 ways: per-device state bytes fall about 4x.
  assert fsdp["state_bytes_per_device"] < 0.3 * dp["state_bytes_per_device"]


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(procs, devices, config, workdir):
  """launch/local.sh on a free port. One retry with a fresh port and workdir: once in five CI
  runs process 0 timed out (2 min) waiting for process 1's CPU topology at start-up."""
  errors = []
  for attempt in range(2):
    target = workdir if attempt == 0 else workdir + "_retry"
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), procs, devices,
                             f"--config={config}", f"--workdir={target}"], capture_output=True,
                            text=True, timeout=600,
                            env=dict(os.environ, JAXFT_PORT=str(_free_port())))
    if result.returncode == 0:
      return target
    errors.append(result.stderr[-3000:])
    if "local_topology" not in result.stderr:
      break
  raise AssertionError("\n---\n".join(errors))


def _srun(ntasks: int, devices: int, config: str, workdir: str) -> str:
  """Two processes started as srun starts the tasks of a step (tests/fake_srun.py): jaxft
  finds them from SLURM's variables alone (parallel.distributed=auto)."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fake_srun.py"),
                           f"--ntasks={ntasks}", f"--cpu_devices={devices}", "--",
                           sys.executable, "-m", "jaxft.train", f"--config={config}",
                           f"--workdir={workdir}"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow  # 60 s: the default run stays under 15 minutes
def test_two_processes_match_one_process(tmp_path, tiny_model_dir, sentiment_files):
  """Two SLURM tasks of 4 CPU devices each (through a stand-in for srun) against one process
  of 8 devices (launch/local.sh): the same losses."""
  config = write_config_file(tmp_path / "tiny.py", tiny_model_dir, *sentiment_files,
                             warmup_ratio=0.0, num_train_steps=24)
  runs = {"two_by_four": _srun(2, 4, config, str(tmp_path / "two_by_four")),
          "one_by_eight": _launch("1", "8", config, str(tmp_path / "one_by_eight"))}
  losses = {n: [r["loss"] for r in read_metrics(w, "train")] for n, w in runs.items()}
  assert len(losses["two_by_four"]) == 24
  assert _max_relative_difference(losses["one_by_eight"], losses["two_by_four"]) < 1e-4
  assert "24" in os.listdir(os.path.join(runs["two_by_four"], "checkpoints"))

  # The two-process checkpoint, evaluated by one process on one device.
  trained = read_metrics(runs["two_by_four"], "validation")[-1]
  result = subprocess.run([sys.executable, "-m", "jaxft.evaluate",
                           f"--workdir={runs['two_by_four']}", "--checkpoint=latest"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(runs["two_by_four"], "eval", "validation-step24.json")) as f:
    evaluated = json.load(f)["metrics"]
  for key in ("accuracy", "macro_f1", "mcc"):
    assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key
  assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_launcher_fails_when_a_process_fails(tmp_path):
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "2", "1",
                           "--config=configs/nope.py", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode != 0


@pytest.mark.slow  # 30-70 s: the default run stays under 15 minutes
def test_preempting_one_host_saves_the_same_step_on_every_host(tmp_path, tiny_model_dir,
                                                               sentiment_files):
  """SIGTERM to process 1 only: JAX's preemption sync makes both processes save one step and
  exit 75; the same command then resumes from it and finishes."""
  import signal
  import time
  config = write_config_file(tmp_path / "tiny.py", tiny_model_dir, *sentiment_files,
                             warmup_ratio=0.0, num_train_steps=150, eval_every=50)
  workdir = str(tmp_path / "run")

  def start():
    port = str(_free_port())
    return [subprocess.Popen(
        [sys.executable, "-m", "jaxft.train", f"--config={config}", f"--workdir={workdir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAXFT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAXFT_NUM_PROCESSES="2", JAXFT_PROCESS_ID=str(i))) for i in range(2)]

  procs = start()
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics) and
                                        sum(1 for _ in open(metrics)) >= 20):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  step = saved[-1]
  assert 20 <= step < 150
  assert f"saved a checkpoint at step {step}" in outputs[0]

  procs = start()
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
  assert f"resumed from step {step}" in outputs[0]
  assert [r["step"] for r in read_metrics(workdir, "train")][-1] == 150


def _slurm(**values) -> dict:
  """The variables srun sets in a task, for a job on GPU nodes."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NODEID": "0"}
  env.update({k: str(v) for k, v in values.items()})
  return env


@pytest.mark.parametrize("name, env, expected", [
    ("one task per GPU, each bound to its GPU (--gpus-per-task=1)",
     _slurm(SLURM_STEP_NUM_TASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3,
            SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_NODEID=1, SLURM_GPUS_PER_TASK=1,
            CUDA_VISIBLE_DEVICES="3"),
     {"num_processes": 16, "process_id": 11, "local_device_ids": [0]}),
    ("one task per GPU, every task sees the node's 8 GPUs",
     _slurm(SLURM_STEP_NUM_TASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3,
            SLURM_STEP_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"),
     {"num_processes": 16, "process_id": 11, "local_device_ids": [3]}),
    ("one task per node with its 8 GPUs",
     _slurm(SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0,
            SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_GPUS="0,1,2,3,4,5,6,7"),
     {"num_processes": 2, "process_id": 1, "local_device_ids": list(range(8))}),
])
def test_slurm_layouts_give_jax_the_right_processes_and_devices(name, env, expected, tmp_path):
  from jaxft import parallel
  assert parallel.wants_distributed("auto", env), name
  assert parallel.distributed_arguments(env) == expected, name


def test_a_single_process_inside_a_multi_task_allocation_stays_alone(tmp_path):
  """A script started directly inside `salloc -n 8` (or an sbatch batch step) sees
  SLURM_NTASKS=8 but is one process: starting jax.distributed would wait for 7 more forever."""
  from jaxft import parallel
  salloc = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu01"}
  assert not parallel.wants_distributed("auto", salloc)
  batch_step = {**salloc, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1"}
  assert not parallel.wants_distributed("auto", batch_step)
  assert parallel.wants_distributed("on", salloc) and not parallel.wants_distributed("off", {
      "JAXFT_COORDINATOR_ADDRESS": "h:1"})
  # The node's GPUs from its device files where SLURM says nothing of them.
  (tmp_path / "nvidia0").touch()
  (tmp_path / "nvidia1").touch()
  (tmp_path / "nvidiactl").touch()
  assert parallel.slurm_local_device_ids({"SLURM_STEP_TASKS_PER_NODE": "1"},
                                         device_dir=str(tmp_path)) == [0, 1]
  assert parallel.slurm_local_device_ids({}, device_dir=str(tmp_path / "none")) is None


@pytest.fixture(scope="module")
def peft_layout_runs(tmp_path_factory, minilm_dir, sentiment_files):
  return _layout_results(tmp_path_factory.mktemp("peft_layouts"), minilm_dir, sentiment_files,
                         ["one:jit:1", *PEFT_LAYOUTS])


@pytest.mark.slow  # 20 runs, 6-7 minutes
def test_every_peft_method_trains_the_same_under_every_parallel_mode(peft_layout_runs):
  runs = peft_layout_runs
  for method in ("lora", "dora", "ia3", "adapter", "prompt", "prefix", "prefixpacked"):
    reference = runs[f"{method}_one"]["losses"]
    assert _max_relative_difference(reference, runs["one"]["losses"]) > 1e-3, method
    others = ("dp2fsdp4",) if method == "prefixpacked" else ("fsdp_tp", "pmap")
    for layout in others:
      name = f"{method}_{layout}"
      assert _max_relative_difference(reference, runs[name]["losses"]) < 1e-4, name
      assert abs(runs[name]["accuracy"] - runs[f"{method}_one"]["accuracy"]) <= 1e-3, name
