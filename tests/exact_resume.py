"""Kill a real training process with SIGKILL at random moments, resume each time, and compare the
final parameters with an uninterrupted run, bit for bit.

  python tests/exact_resume.py [--kills=20] [--steps=120] [--seed=0] [--remote] [--workdir=DIR]

Trains a tiny random BERT (made on the fly, with the default model's tokenizer) on synthetic
sentences, checkpointing every 4 steps asynchronously. The kills fall at random moments of three
kinds, in turns: a random time after the process starts (start-up, restore, compiling,
training), a random logged step, and the instant a checkpoint save is seen in flight. With
--remote the interrupted run's workdir is gs://BUCKET/killed on a local GCS emulator
(tests/gcs_emulator.py). Prints a summary and exits 0 when no restore found a damaged checkpoint
and every parameter equals the uninterrupted run's exactly.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

SAVE_EVERY = 4
KINDS = ("time", "step", "save")


def _last_logged_step(workdir: str) -> int:
  from jaxft.metrics import read_metrics
  try:
    records = read_metrics(workdir, "train")
  except (OSError, ValueError):  # a file being replaced at this instant
    return 0
  return records[-1]["step"] if records else 0


def _step_folders(workdir: str) -> tuple[list[int], set[str]]:
  """(committed checkpoint steps, folders of saves not committed): orbax writes a local
  checkpoint into a temporary folder and renames it; on GCS, which cannot rename, it writes the
  step folder and marks it committed last (commit_success.txt)."""
  from jaxft import storage
  directory = storage.join(workdir, "checkpoints")
  names = storage.listdir(directory)
  pending = {name for name in names if "tmp" in name}
  committed = []
  for name in filter(str.isdigit, names):
    if storage.is_remote(workdir) and "commit_success.txt" not in storage.listdir(
        storage.join(directory, name)):
      pending.add(name)
    else:
      committed.append(int(name))
  return sorted(committed), pending


def save_in_flight(workdir: str, stale: set[str] = frozenset()) -> bool:
  """Whether a save is being written now (`stale`: what a killed save left behind, which the
  next process cleans up)."""
  return bool(_step_folders(workdir)[1] - stale)


def _train_command(config: str, workdir: str) -> list[str]:
  return [sys.executable, "-m", "jaxft.train", f"--config={config}", f"--workdir={workdir}"]


def _wait_for(proc, condition, timeout: float) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not condition():
    time.sleep(0.02)


def run_with_kills(config: str, workdir: str, kills: int, steps: int, rng: random.Random,
                   env: dict, logs: str, log=print) -> dict:
  """Starts training, SIGKILLs it at a random moment of each kind in turn, restarts, and finally
  lets it finish. Returns what happened: the kills, those that fell during a save, and the
  damaged checkpoints any restore met."""
  killed = []
  for i in range(kills):
    kind = KINDS[i % len(KINDS)]
    out = open(os.path.join(logs, f"run{i}.log"), "w")
    proc = subprocess.Popen(_train_command(config, workdir), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    start = time.time()
    committed, stale = _step_folders(workdir)
    restored = max(committed, default=0)
    if kind == "time":  # anywhere: start-up, restore, compiling, the first steps
      delay = rng.uniform(0.5, 12.0)
      _wait_for(proc, lambda: time.time() - start > delay, 60)
    elif kind == "step":  # a few steps after this process's first committed save: progress
      _wait_for(proc, lambda: max(_step_folders(workdir)[0], default=0) > restored, 300)
      target = min(steps - 1, _last_logged_step(workdir) + rng.randint(1, SAVE_EVERY))
      _wait_for(proc, lambda: _last_logged_step(workdir) >= target, 300)
    else:  # while a save is being written, after the first save of this process
      later = restored + rng.randint(1, 2) * SAVE_EVERY
      _wait_for(proc, lambda: _last_logged_step(workdir) >= later - 1, 300)
      _wait_for(proc, lambda: save_in_flight(workdir, stale), 300)
    during_save = save_in_flight(workdir, stale)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out.close()
    killed.append({"kind": kind, "seconds": round(time.time() - start, 2),
                   "logged_step": _last_logged_step(workdir), "during_save": during_save,
                   "finished_first": finished})
    log(f"kill {i + 1}: {killed[-1]}")
  final = subprocess.run(_train_command(config, workdir), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
  with open(os.path.join(logs, "final.log"), "w") as f:
    f.write(final.stdout + final.stderr)
  if final.returncode != 0:
    raise RuntimeError(f"the final resumed run failed: {final.stderr[-2000:]}")
  texts = [pathlib.Path(logs, name).read_text(errors="replace") for name in os.listdir(logs)]
  return {"kills": killed, "during_save": sum(k["during_save"] for k in killed),
          "damaged_restores": sum(t.count(" is damaged (") for t in texts),
          "resumes": sum(t.count("resumed from step") for t in texts)}


def final_params(workdir: str):
  import jax
  from jaxft import inference
  _, step, params = inference.restore(workdir, "latest")
  return step, jax.device_get(params)


def compare(a, b) -> int:
  """The number of parameter leaves that differ in any bit."""
  import jax
  import numpy as np
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return sum(0 if np.array_equal(x, y) else 1 for x, y in zip(leaves_a, leaves_b))


def prepare(root: str, steps: int) -> str:
  """The tiny model, data and config (checkpoints every SAVE_EVERY steps, async, 3 kept)."""
  from tests.conftest import make_tiny_model, synthetic_sentiment, write_config_file, write_tsv
  from jaxft import models
  os.makedirs(root, exist_ok=True)
  model = make_tiny_model(os.path.join(root, "model"), models.resolve_model_dir("minilm"))
  train_file = write_tsv(os.path.join(root, "train.tsv"), synthetic_sentiment(192, 0))
  dev_file = write_tsv(os.path.join(root, "dev.tsv"), synthetic_sentiment(70, 1))
  config = write_config_file(pathlib.Path(root) / "config.py", model, train_file, dev_file,
                             num_train_steps=steps, eval_every=steps, log_every=1)
  with open(config, "a") as f:
    f.write("\n_base = get_config\ndef get_config():\n  c = _base()\n  with c.unlocked():\n"
            f"    c.checkpoint.save_every = {SAVE_EVERY}\n    c.checkpoint.keep_latest = 3\n"
            "  return c\n")
  return config


def check(kills: int, steps: int, seed: int, root: str, remote_env=None, log=print) -> dict:
  """Runs the whole check; `remote_env` (tests/gcs_emulator.Emulator) puts the interrupted run
  on its bucket. Returns the summary, with "identical" and "differing" arrays."""
  config = prepare(root, steps)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",  # a killed run's lines too
             **(remote_env.env if remote_env else {}))
  os.environ.update(remote_env.env if remote_env else {})  # this process reads the bucket too
  straight = os.path.join(root, "straight")
  subprocess.run(_train_command(config, straight), cwd=REPO, check=True, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  workdir = (f"gs://{remote_env.bucket}/killed-{seed}" if remote_env
             else os.path.join(root, "killed"))
  logs = os.path.join(root, "logs")
  os.makedirs(logs, exist_ok=True)
  summary = run_with_kills(config, workdir, kills, steps, random.Random(seed), env, logs, log)
  step_a, params_a = final_params(straight)
  step_b, params_b = final_params(workdir)
  summary.update(final_steps=(step_a, step_b), differing=compare(params_a, params_b),
                 workdir=workdir)
  summary["identical"] = step_a == step_b == steps and summary["differing"] == 0
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--remote", action="store_true", help="the interrupted run on a GCS emulator")
  p.add_argument("--workdir", default=None)
  args = p.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="jaxft-exact-resume-")
  emulator = None
  if args.remote:
    from tests.gcs_emulator import Emulator
    emulator = Emulator()
  try:
    summary = check(args.kills, args.steps, args.seed, root, emulator)
  finally:
    if emulator is not None:
      emulator.stop()
  print(f"{len(summary['kills'])} kills ({summary['during_save']} during a save), "
        f"{summary['resumes']} resumes, {summary['damaged_restores']} damaged checkpoints met; "
        f"final steps {summary['final_steps']}; {summary['differing']} parameter arrays differ",
        flush=True)
  ok = summary["identical"] and summary["damaged_restores"] == 0
  print("BIT-IDENTICAL" if ok else "MISMATCH", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
