"""Kill a real training process with SIGKILL at random steps, resume each time, and compare the
final parameters with an uninterrupted run, bit for bit.

  python tests/exact_resume.py [--kills=5] [--steps=120] [--seed=0] [--workdir=DIR]

Trains a tiny random BERT (made on the fly, with the default model's tokenizer) on synthetic
sentences. Checkpoints are saved every 4 steps, asynchronously; one kill is aimed at a step right
after a save starts, to land in the middle of writing it. Exits 0 when every parameter of the
resumed run equals the uninterrupted run's exactly.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

SAVE_EVERY = 4


def _last_logged_step(workdir: str) -> int:
  from jaxft.metrics import read_metrics
  records = read_metrics(workdir, "train")
  return records[-1]["step"] if records else 0


def _train_command(config: str, workdir: str) -> list[str]:
  return [sys.executable, "-m", "jaxft.train", f"--config={config}", f"--workdir={workdir}"]


def run_with_kills(config: str, workdir: str, kill_steps: list[int], log) -> list[int]:
  """Starts training, SIGKILLs it once the log reaches each kill step, restarts; returns the
  checkpoint step each restart resumed from."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for target in kill_steps:
    proc = subprocess.Popen(_train_command(config, workdir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and _last_logged_step(workdir) < target:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log(f"killed at logged step {_last_logged_step(workdir)} (aimed at {target})")
  final = subprocess.run(_train_command(config, workdir), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
  if final.returncode != 0:
    raise RuntimeError(f"the final resumed run failed: {final.stderr[-2000:]}")
  return [int(line.split("resumed from step ")[1].split()[0])
          for line in (final.stdout + final.stderr).splitlines() if "resumed from step" in line]


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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kills", type=int, default=5)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None)
  args = p.parse_args(argv)
  from tests.conftest import make_tiny_model, synthetic_sentiment, write_config_file, write_tsv
  from jaxft import models

  root = args.workdir or tempfile.mkdtemp(prefix="jaxft-exact-resume-")
  os.makedirs(root, exist_ok=True)
  model = make_tiny_model(os.path.join(root, "model"), models.resolve_model_dir("minilm"))
  train_file = write_tsv(os.path.join(root, "train.tsv"), synthetic_sentiment(192, 0))
  dev_file = write_tsv(os.path.join(root, "dev.tsv"), synthetic_sentiment(70, 1))
  import pathlib
  config = write_config_file(pathlib.Path(root) / "config.py", model, train_file, dev_file,
                             num_train_steps=args.steps, eval_every=args.steps,
                             log_every=1)
  with open(config, "a") as f:  # checkpoints often, asynchronously, all of them kept
    f.write("\n_base = get_config\ndef get_config():\n  c = _base()\n  with c.unlocked():\n"
            f"    c.checkpoint.save_every = {SAVE_EVERY}\n    c.checkpoint.keep_latest = 3\n"
            "  return c\n")

  rng = random.Random(args.seed)
  kill_steps = sorted(rng.sample(range(3, args.steps - 2), args.kills))
  kill_steps[len(kill_steps) // 2] = (kill_steps[len(kill_steps) // 2] // SAVE_EVERY
                                      ) * SAVE_EVERY or SAVE_EVERY  # right as a save starts
  kill_steps = sorted(set(kill_steps))
  print(f"workdir {root}; kill steps {kill_steps}", flush=True)

  straight = os.path.join(root, "straight")
  subprocess.run(_train_command(config, straight), cwd=REPO, check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed = os.path.join(root, "killed")
  resumed_from = run_with_kills(config, killed, kill_steps, lambda m: print(m, flush=True))
  step_a, params_a = final_params(straight)
  step_b, params_b = final_params(killed)
  differing = compare(params_a, params_b)
  print(f"final step {step_a} vs {step_b}; last resume from step {resumed_from}; "
        f"{differing} parameter arrays differ", flush=True)
  ok = step_a == step_b == args.steps and differing == 0
  print("BIT-IDENTICAL" if ok else "MISMATCH", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
