"""jaxft-sweep (jaxft/sweep/): search-space checks, trials as ordinary runs, pruning, a sweep
killed and resumed, the best config, the report, each worker's devices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, write_config_file
from jaxft import config as config_lib
from jaxft.errors import UserError
from jaxft.sweep import devices, space


def _sweep_file(path, params: str, **keys) -> str:
  lines = "".join(f"  s.{k} = {v!r}\n" for k, v in keys.items())
  path.write_text(
      "from jaxft.sweep.space import categorical, integer, log_uniform, sweep_config, uniform\n"
      "def get_config():\n"
      "  s = sweep_config()\n"
      f"  s.params = {params}\n"
      f"{lines}"
      "  s.lock()\n"
      "  return s\n")
  return str(path)


@pytest.fixture
def tiny_config_file(tmp_path, tiny_model_dir, sentiment_files):
  """The tiny model for 4 epochs (48 steps): time for 4 evaluations and a kill between them."""
  return write_config_file(tmp_path / "tiny.py", tiny_model_dir, *sentiment_files,
                           num_epochs=4.0, warmup_ratio=0.0, log_every=12)


def _sweep(args: list, **popen) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.Popen([sys.executable, "-m", "jaxft.sweep", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **popen)


def _finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _study(directory: str):
  from jaxft.sweep import study as study_lib
  return study_lib.load_study(directory)


# ---- the search space ------------------------------------------------------------------------
@pytest.mark.parametrize("params, keys, message", [
    ("(('train.learnin_rate', log_uniform(1e-5, 1e-3)),)", {},
     "sweep params key train.learnin_rate is not a config key"),
    ("(('train.learning_rate', log_uniform(1e-3, 1e-5)),)", {}, "low=0.001 must be below high"),
    ("(('train.learning_rate', log_uniform(0.0, 1e-3)),)", {}, "a log scale needs low > 0"),
    ("(('train.batch_size', categorical(16, 0)),)", {}, "train.batch_size=0 must be a positive"),
    ("(('train.batch_size', categorical('big')),)", {}, "train.batch_size='big' does not fit"),
    ("(('train.learning_rate', (1e-5, 1e-3)),)", {}, "is not a distribution"),
    ("(('train.learning_rate', log_uniform(1e-5, 1e-3)),)", {"sampler": "grid"},
     "sampler=grid needs categorical params"),
    ("(('train.learning_rate', log_uniform(1e-5, 1e-3)),)", {"pruner": "hyperband"},
     "pruner='hyperband' is not supported"),
    ("(('train.learning_rate', log_uniform(1e-5, 1e-3)),)",
     {"fixed": (("train.learning_rate", 1e-4),)}, "keep it in one of them"),
    ("()", {}, "sets no params"),
    ("(('train.batch_size', categorical(8)), ('train.batch_size', categorical(16)))", {},
     "name train.batch_size twice"),
])
def test_a_bad_search_space_is_one_error_before_any_trial(tmp_path, tiny_config, params, keys,
                                                          message):
  sweep = config_lib.load_config_file(_sweep_file(tmp_path / "s.py", params, **keys))
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    space.check_space(sweep, tiny_config)


def test_the_command_reports_a_bad_space_in_one_line_and_writes_nothing(tmp_path,
                                                                       tiny_config_file):
  sweep_file = _sweep_file(tmp_path / "s.py", "(('train.learnin_rate', log_uniform(1e-5, 1e-3)),)")
  code, out, err = _finished(_sweep([f"--config={tiny_config_file}", f"--sweep={sweep_file}",
                                     f"--workdir={tmp_path / 'sweep'}", "--trials=2"]))
  assert code == 2, err
  assert err.strip().splitlines() == ["jaxft: error: sweep params key train.learnin_rate is not "
                                      "a config key; see jaxft/config.py for the keys"]
  assert not (tmp_path / "sweep").exists()


def test_trial_settings_and_the_baseline(tiny_config, tmp_path):
  sweep = config_lib.load_config_file(_sweep_file(
      tmp_path / "s.py", "(('train.learning_rate', log_uniform(1e-3, 1e-2)), "
      "('train.batch_size', categorical(8, 16)))", fixed=(("train.weight_decay", 0.0),)))
  settings = space.trial_settings(sweep, {"train.learning_rate": 5e-3, "train.batch_size": 8})
  assert settings == {"train.num_evaluations": 4, "train.eval_every": 0,
                      "train.weight_decay": 0.0, "train.learning_rate": 5e-3,
                      "train.batch_size": 8}
  config = space.trial_config(tiny_config, sweep, {"train.batch_size": 8})
  assert config.train.batch_size == 8 and config.train.num_evaluations == 4
  assert space.baseline_values(tiny_config, sweep) == {"train.learning_rate": 3e-3,
                                                       "train.batch_size": 16}
  outside = space.trial_config(tiny_config, sweep, {"train.batch_size": 32})
  assert space.baseline_values(outside, sweep) == {}


# ---- where workers run -----------------------------------------------------------------------
def test_workers_split_the_cores_or_the_gpus(monkeypatch):
  monkeypatch.delenv("JAXFT_CPU_TUNING", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  env = lambda i, n, **kw: devices.worker_environment(i, n, {}, **kw)
  assert [env(i, 2, cores=[0, 1, 2, 3])[devices.CORES] for i in range(2)] == ["0,1", "2,3"]
  assert [env(i, 3, cores=[0, 1])[devices.CORES] for i in range(3)] == ["0", "1", "0"]
  assert [env(i, 3, cores=list(range(8)))[devices.CORES] for i in range(3)] == [
      "0,1,2", "3,4,5", "6,7"]
  assert env(1, 2, cores=[0, 1])["JAXFT_LOCAL_PROCESSES"] == "2"
  gpus = [env(i, 4, gpus=["0", "1", "2", "3", "4", "5", "6", "7"]) for i in range(4)]
  assert [g["CUDA_VISIBLE_DEVICES"] for g in gpus] == ["0,1", "2,3", "4,5", "6,7"]
  assert all(devices.CORES not in g for g in gpus)
  assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
  monkeypatch.setenv("JAXFT_CPU_TUNING", "0")  # the CPU layer off: no pinning
  assert devices.CORES not in env(0, 2, cores=[0, 1])
  monkeypatch.setattr(devices.runtime, "installed_distributions", lambda: {"libtpu": "0.0.30"})
  with pytest.raises(UserError, match="a TPU host's chips serve one process"):
    devices.worker_environments(2)


# ---- whole sweeps ------------------------------------------------------------------------------
def _validation(workdir: str) -> list[dict]:
  from jaxft.metrics import read_metrics
  return read_metrics(workdir, "validation")


def test_a_sweep_runs_its_trials_as_ordinary_runs_and_writes_the_best_config(
    tmp_path, tiny_config_file):
  from jaxft import evaluate, train
  from jaxft.checkpoint import checkpoint_dir
  from jaxft.report import write_report
  sweep_file = _sweep_file(tmp_path / "s.py", "(('train.learning_rate', log_uniform(1e-3, 1e-2)), "
                           "('train.batch_size', categorical(16, 32)))", startup_trials=2)
  directory = str(tmp_path / "sweep")
  code, out, err = _finished(_sweep([f"--config={tiny_config_file}", f"--sweep={sweep_file}",
                                     "--workdir", directory, "--trials=4", "--workers=2"]))
  assert code == 0, err + out
  study = _study(directory)
  trials = study.get_trials()
  assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
  assert trials[0].user_attrs["baseline"]
  assert trials[0].params == {"train.learning_rate": 3e-3, "train.batch_size": 16}
  ran = [_read(os.path.join(directory, "workers", f"{i}.log")).count("\ntrial ")
         for i in range(2)]
  assert min(ran) >= 1, ran  # both workers ran trials
  for t in trials:
    workdir = os.path.join(directory, "trials", str(t.number))
    saved = config_lib.from_json(_read(os.path.join(workdir, "config.json")))
    assert saved.train.learning_rate == t.params["train.learning_rate"]
    assert saved.train.batch_size == t.params["train.batch_size"]
    assert saved.train.num_evaluations == 4
    records = _validation(workdir)
    assert [r["accuracy"] for r in records] == [t.intermediate_values[i + 1]
                                                for i in range(len(records))]
    if t.state.name == "COMPLETE":
      assert len(records) == 4 and t.value == max(r["accuracy"] for r in records)
      assert len(os.listdir(checkpoint_dir(workdir))) == 1  # the best only
  best = study.best_trial
  best_dir = os.path.join(directory, "trials", str(best.number))
  assert evaluate.evaluate_checkpoint(best_dir)["metrics"]["accuracy"] == best.value
  assert f"best: trial {best.number}: complete accuracy={best.value:.4f}" in out

  best_config = config_lib.load_config_file(os.path.join(directory, "best_config.py"))
  assert best_config.train.learning_rate == best.params["train.learning_rate"]
  train.train_and_evaluate(best_config, str(tmp_path / "again"))
  assert max(r["accuracy"] for r in _validation(str(tmp_path / "again"))) == best.value

  with open(write_report([directory])) as f:
    report = f.read()
  assert all(f"| {t.number}" in report for t in trials)
  assert all(os.path.exists(os.path.join(directory, "report", name))
             for name in ("trials.png", "evaluations.png", "slices.png"))


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the sweep ended first: {proc.communicate()}")
    if time.time() > deadline:
      raise AssertionError("timed out")
    time.sleep(0.05)


def _evaluations_of(directory: str, number: int) -> int:
  return len(_validation(os.path.join(directory, "trials", str(number))))


@pytest.mark.slow  # 30-70 s: the default run stays under 15 minutes
def test_a_killed_sweep_resumes_without_repeating_trials_and_prunes(tmp_path, tiny_config_file):
  """SIGKILL mid-trial, then SIGTERM, then to the end: the finished trials are never run
  again, each interrupted trial goes on from its checkpoint as a new trial, and the median
  pruner stops only trials whose learning rate is too small to learn."""
  sweep_file = _sweep_file(tmp_path / "s.py",
                           "(('train.learning_rate', categorical(3e-3, 1e-7, 4e-3, 2e-7)),)",
                           sampler="grid", startup_trials=2)
  directory = str(tmp_path / "sweep")
  args = [f"--config={tiny_config_file}", f"--sweep={sweep_file}", f"--workdir={directory}",
          "--trials=4", "--workers=1"]

  # The command and its worker killed while trial 1 runs, once the checkpoint of its first
  # evaluation is complete (orbax renames a checkpoint's folder to its step when it is).
  first = _sweep(args)
  _wait_for(lambda: os.path.isdir(os.path.join(directory, "trials", "1", "checkpoints", "12")),
            first)
  os.killpg(first.pid, signal.SIGKILL)
  first.wait()
  trial0 = os.path.join(directory, "trials", "0", "metrics.jsonl")
  before = (os.path.getmtime(trial0), _read(trial0))
  assert _evaluations_of(directory, 0) == 4  # the first trial had finished

  second = _sweep(args)  # trial 1 goes on as trial 2; SIGTERM after its next evaluation
  _wait_for(lambda: _evaluations_of(directory, 2) >= 3, second)
  second.send_signal(signal.SIGTERM)
  code, out, _ = _finished(second)
  assert code == 75 and "run the same command again to resume" in out

  code, out, err = _finished(_sweep(args))
  assert code == 0, err + out
  trials = _study(directory).get_trials()
  by_number = {t.number: t for t in trials}
  interrupted = [t.number for t in trials if t.state.name == "FAIL"]
  continued = {t.user_attrs["continues"]: t.number for t in trials if "continues" in t.user_attrs}
  assert interrupted[0] == 1 and continued[1] == 2 and sorted(continued) == interrupted
  for n in interrupted:  # the same values, in the same directory, moved on
    assert by_number[continued[n]].params == by_number[n].params
    assert not os.path.exists(os.path.join(directory, "trials", str(n)))
  log = _read(os.path.join(directory, "workers", "0.log"))
  assert "resumed from step" in log
  finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
  assert len(finished) == 4 and len(trials) == 4 + len(interrupted)
  assert (os.path.getmtime(trial0), _read(trial0)) == before  # never run again
  assert sorted(t.params["train.learning_rate"] for t in finished) == [1e-7, 2e-7, 3e-3, 4e-3]
  pruned = [t for t in finished if t.state.name == "PRUNED"]
  assert pruned and all(t.params["train.learning_rate"] < 1e-6 for t in pruned)
  for t in pruned:
    assert len(t.intermediate_values) < 4
    assert os.listdir(os.path.join(directory, "trials", str(t.number), "checkpoints")) == []
  assert f"sweep {directory}: {len(trials)} trials (" in out
  assert f"{len(interrupted)} interrupted" in out
