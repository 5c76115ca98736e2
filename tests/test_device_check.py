"""launch/device_check.sh's dry run on the CPU: the GPU check's every part (jaxft's step at fixed
shapes, PyTorch's in its own process, the SST-2 epochs under the profiler, the table) on tiny
shapes, so that the one prepared GPU command is known to run before a GPU is lent."""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # 70 s: run it with -m slow before a lent GPU, and after changing it
def test_the_device_check_runs_through_on_the_cpu(tmp_path):
  demo = os.path.join(REPO, "configs", "demo_data", "sst2")
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "device_check.sh"), str(tmp_path), "--dry_run",
       f"--sst2_train={demo}/train.tsv", f"--sst2_dev={demo}/dev.tsv"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  with open(tmp_path / "device_check.json") as f:
    report = json.load(f)
  (row,) = report["steps"]
  assert row["name"] == "tiny, 4 x 16" and row["jaxft"]["step_s"] > 0
  assert row["jaxft"]["compute_dtype"] == "float32"  # the CPU's default
  assert row["pytorch eager"]["step_s"] > 0, row["pytorch eager"]
  sst2 = report["sst2"]
  assert sst2["epoch1_wall_from_process_start_s"] > 0 and sst2["epoch2_s"] > 0
  assert sst2["epoch1_compiles"] > 0
  assert "| tiny, 4 x 16 | jaxft |" in result.stdout
  assert "| tiny, 4 x 16 | pytorch eager |" in result.stdout
  assert "SST-2 (64 sentences)" in result.stdout
