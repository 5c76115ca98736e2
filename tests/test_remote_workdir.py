"""--workdir=gs://...: a run on a local GCS emulator (tests/gcs_emulator.py) is killed with
SIGKILL, resumes exactly, then evaluates, predicts, exports and reports from the bucket; nothing
lands on the local disk under a folder named "gs:"."""

import json
import os

import pytest

from jaxft import storage

from tests import exact_resume
from tests.conftest import REPO


@pytest.fixture(scope="module")
def emulator():
  from tests.gcs_emulator import Emulator
  server = Emulator()
  yield server
  server.stop()


def _no_gs_folder(*roots) -> None:
  for root in roots:
    for folder, dirs, _ in os.walk(root):
      assert "gs:" not in dirs, folder
      dirs[:] = [d for d in dirs if d not in (".venv", ".git")]


def test_a_run_on_gcs_is_killed_resumes_exactly_and_serves_everything_from_there(
    emulator, tmp_path, monkeypatch):
  for name, value in emulator.env.items():
    monkeypatch.setenv(name, value)
  summary = exact_resume.check(kills=2, steps=24, seed=3, root=str(tmp_path),
                               remote_env=emulator, log=lambda _: None)
  assert summary["identical"], summary
  assert summary["damaged_restores"] == 0 and summary["resumes"] >= 1, summary
  workdir = summary["workdir"]
  assert workdir.startswith("gs://")

  from jaxft import evaluate, export, predict, report
  record = evaluate.evaluate_checkpoint(workdir, "latest")
  assert record["step"] == 24
  saved = json.loads(storage.read_text(storage.join(workdir, "eval", "validation-step24.json")))
  assert saved["metrics"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("a wonderful film\nawful and dull\n")
  records = predict.predict(workdir, str(inputs), storage.join(workdir, "predictions.jsonl"),
                            "latest")
  lines = storage.read_text(storage.join(workdir, "predictions.jsonl")).splitlines()
  assert [json.loads(l)["label"] for l in lines] == [r["label"] for r in records]
  export.export(workdir, storage.join(workdir, "export"), "hf", "latest")
  assert {"config.json", "model.safetensors", "jaxft_config.json"} <= set(
      storage.listdir(storage.join(workdir, "export")))
  path = report.write_report([workdir])
  assert path == storage.join(workdir, "report", "report.md")
  assert "loss.png" in storage.listdir(storage.join(workdir, "report"))
  assert {"config.json", "run.json", "metrics.jsonl", "tb"} <= set(storage.listdir(workdir))
  _no_gs_folder(REPO, str(tmp_path), os.getcwd())
