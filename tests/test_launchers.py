"""launch/tpu_pod.sh against a stand-in for `gcloud` that runs each TPU worker's commands on this
machine, in a home folder of its own: workers run detached with their own logs, the launcher
waits for all, stops all when one fails, and a new launch first ends what an old one left."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO

_GCLOUD = textwrap.dedent('''\
    #!{python}
    """gcloud compute tpus tpu-vm describe|ssh, for FAKE_TPU_WORKERS workers on this machine."""
    import os, subprocess, sys
    args = sys.argv[1:]
    options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    workers = int(os.environ["FAKE_TPU_WORKERS"])
    if "describe" in args:
        print(";".join(f"10.0.0.{{i}}" for i in range(workers)))
        sys.exit(0)
    chosen = range(workers) if options["worker"] == "all" else [int(options["worker"])]
    status = 0
    for w in chosen:
        home = os.path.join(os.environ["FAKE_TPU_HOMES"], f"worker{{w}}")
        status = subprocess.run(["bash", "-c", options["command"]],
                                env=dict(os.environ, HOME=home)).returncode or status
    sys.exit(status)
''')

_WORKER = textwrap.dedent('''\
    """What a worker runs in these tests (JAXFT_MODULE=fake_worker): --fail=W exits 3 on
    worker W after a second, every other worker sleeps --seconds."""
    import os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    print(f"worker {os.environ.get('TPU_WORKER_ID')} pid {os.getpid()}", flush=True)
    if os.environ.get("TPU_WORKER_ID") == args.get("fail"):
        time.sleep(1)
        sys.exit(3)
    time.sleep(float(args.get("seconds", "0")))
''')


@pytest.fixture
def pod(tmp_path):
  """Two fake workers: ~/jaxft is a folder with .venv/bin/python and the fake worker module."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  homes = tmp_path / "homes"
  for w in range(2):
    repo = homes / f"worker{w}" / "jaxft"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (repo / "fake_worker.py").write_text(_WORKER)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             FAKE_TPU_WORKERS="2", FAKE_TPU_HOMES=str(homes), JAXFT_MODULE="fake_worker",
             JAXFT_POLL_SECONDS="0.5")
  return homes, env


def _launch(env, *flags, wait=True):
  cmd = ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "my-tpu", "us-central2-b", *flags]
  if not wait:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _recorded_pids(homes):
  return [int((homes / f"worker{w}" / "jaxft" / ".tpu_pod.pid").read_text())
          for w in range(2)]


def test_all_workers_finish_detached_each_with_its_log(pod):
  homes, env = pod
  result = _launch(env, "--seconds=1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "all 2 workers finished" in result.stdout
  for w in range(2):
    log = homes / f"worker{w}" / "jaxft" / "logs" / f"tpu_pod-worker{w}.log"
    assert log.read_text().startswith(f"worker {w} pid ")


def test_one_failing_worker_stops_the_others(pod):
  homes, env = pod
  start = time.time()
  result = _launch(env, "--fail=1", "--seconds=60")
  assert result.returncode == 3, result.stdout + result.stderr
  assert "worker 1 exited with status 3; stopping the others" in result.stderr
  assert time.time() - start < 30  # worker 0 did not sleep its 60 s out
  assert not (homes / "worker0" / "jaxft" / ".tpu_pod.pid").exists()


def test_a_new_launch_first_ends_what_the_last_one_left(pod):
  """The launcher is killed (as a dropped connection would end it): the detached workers go on;
  the next launch stops them by their recorded process ids before it starts."""
  homes, env = pod
  first = _launch(env, "--seconds=120", wait=False)
  deadline = time.time() + 60
  while time.time() < deadline and not all(
      (homes / f"worker{w}" / "jaxft" / ".tpu_pod.pid").exists() for w in range(2)):
    time.sleep(0.2)
  time.sleep(1)
  old = _recorded_pids(homes)
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert all(_alive(pid) for pid in old)  # detached: the launcher's end did not stop them
  result = _launch(env, "--seconds=1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert not any(_alive(pid) for pid in old)
