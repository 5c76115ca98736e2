"""Preemption saves and exact resume; non-finite steps change nothing."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import compiled, experiment, train
from jaxft.data import batching
from jaxft.errors import UserError
from jaxft.metrics import read_metrics

from tests import exact_resume
from tests.conftest import REPO, write_config_file


def test_a_non_finite_step_leaves_the_state_unchanged(tiny_config):
  exp = experiment.build(tiny_config)
  tx, learning_rate = exp.optimizer(10)
  train_step = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
  state = exp.init_state(tx)
  before = jax.device_get(state["params"])
  host = batching.make_batch(exp.train_data, np.arange(16), 16, exp.buckets)
  host["weights"] = host["weights"] * np.float32("nan")
  state, metrics = train_step(state, {}, train_step.device_batch(host))
  assert not bool(metrics["finite"]) and int(state["step"]) == 1
  after = jax.device_get(state["params"])
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_policy_stop_names_the_step_and_skip_counts():
  pending = [(7, 512, {"finite": jnp.asarray(True)}), (8, 512, {"finite": jnp.asarray(False)})]
  with pytest.raises(UserError, match="not finite at step 8"):
    train._check_finite(pending, "stop")
  assert train._check_finite(pending, "skip") == 1


def test_sigterm_saves_the_current_step_and_the_rerun_ends_identical(
    tmp_path, tiny_model_dir, sentiment_files):
  config = write_config_file(tmp_path / "cfg.py", tiny_model_dir, *sentiment_files,
                             num_train_steps=400, eval_every=400)
  cmd = [sys.executable, "-m", "jaxft.train", f"--config={config}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  straight = str(tmp_path / "straight")
  assert subprocess.run(cmd + [f"--workdir={straight}"], cwd=REPO, env=env,
                        capture_output=True, timeout=600).returncode == 0

  interrupted = str(tmp_path / "interrupted")
  proc = subprocess.Popen(cmd + [f"--workdir={interrupted}"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(read_metrics(interrupted, "train")) < 30:
    time.sleep(0.2)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  err = out + err
  exit_seconds = time.time() - sent
  assert proc.returncode == train.PREEMPTED_EXIT, err[-2000:]
  assert "SIGTERM: saved a checkpoint at step" in err
  saved = int(err.split("saved a checkpoint at step ")[1].split()[0])
  assert 30 <= saved < 400
  assert str(saved) in os.listdir(os.path.join(interrupted, "checkpoints"))
  print(f"SIGTERM to exit: {exit_seconds:.2f} s (checkpoint at step {saved})")  # for -s runs
  assert exit_seconds < 60

  resumed = subprocess.run(cmd + [f"--workdir={interrupted}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {saved}" in resumed.stderr + resumed.stdout
  a = read_metrics(straight, "validation")[-1]
  b = read_metrics(interrupted, "validation")[-1]
  assert a["step"] == b["step"] == 400
  for key in ("loss", "accuracy", "mcc"):
    assert a[key] == b[key], key  # exact: the resumed run computed the same numbers
  train_a = [r["loss"] for r in read_metrics(straight, "train")]
  train_b = [r["loss"] for r in read_metrics(interrupted, "train")]
  assert train_a == train_b


@pytest.mark.slow  # about 10 min on 2 cores: `pytest -m slow`
@pytest.mark.parametrize("remote", [False, True], ids=["local", "gcs"])
def test_twenty_sigkills_at_random_moments_resume_bit_identical(tmp_path, remote):
  """tests/exact_resume.py: 20 SIGKILLs at random moments (start-up, steps, during async
  saves), on local disk and on a GCS emulator: no restore meets a damaged checkpoint, and the
  final parameters equal an uninterrupted run's in every bit."""
  args = ["--kills=20", "--steps=120", "--seed=1", f"--workdir={tmp_path}"]
  result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "exact_resume.py"),
                           *args, *(["--remote"] if remote else [])],
                          capture_output=True, text=True, timeout=3000, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "BIT-IDENTICAL" in result.stdout and "0 damaged checkpoints met" in result.stdout


@pytest.mark.slow  # 30-70 s: the default run stays under 15 minutes
def test_three_sigkills_resume_bit_identical(tmp_path):
  """The short version of the test above, on local disk (tests/test_remote_workdir.py kills a
  run on GCS)."""
  summary = exact_resume.check(kills=3, steps=24, seed=4, root=str(tmp_path),
                               log=lambda _: None)
  assert summary["identical"] and summary["damaged_restores"] == 0, summary
  assert summary["resumes"] >= 1, summary


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  with tiny_config.unlocked():
    tiny_config.train.num_train_steps = 8
    tiny_config.checkpoint.save_every = 4
    tiny_config.checkpoint.keep_latest = 2
    tiny_config.data.validation_file = None
  train.train_and_evaluate(tiny_config, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["4", "8"]
  # Truncate every array file of the latest checkpoint's state.
  for folder, _, files in os.walk(os.path.join(ckpt_dir, "8", "state")):
    for name in files:
      path = os.path.join(folder, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(16)
  with tiny_config.unlocked():
    tiny_config.train.num_train_steps = 12
  import io, contextlib
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    train.train_and_evaluate(tiny_config, workdir)
  text = out.getvalue()
  assert "checkpoint step 8 is damaged" in text and "resumed from step 4" in text
  names = sorted(os.listdir(ckpt_dir))
  assert "8" in names and "12" in names and any(n.startswith("damaged-8-") for n in names)
