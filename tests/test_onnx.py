"""ONNX export (float32 and int8) round trips against jaxft's own logits and predictions, and
jaxft.predict / jaxft.evaluate on the exported models (jaxft.onnx_export)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

for _package in ("torch", "onnx", "onnxscript", "onnxruntime"):
  pytest.importorskip(_package)

from jaxft import evaluate, export, inference, onnx_export, predict, train  # noqa: E402
from jaxft.errors import UserError  # noqa: E402

from conftest import REPO  # noqa: E402
from test_tasks import _config, _tagged_sentences, _write_conll  # noqa: E402

def _train(config, workdir) -> str:
  """A run of test_tasks' config: 8 epochs, about 5 s here, so that the model predicts both
  classes (the Hugging Face head, BERT's pooler, is still a near-constant after 12 steps)."""
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("USE_TORCH", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _jaxft_logits(workdir, data) -> list:
  exp, _, params = inference.restore(workdir)
  return inference.Predictor(exp).outputs(params, data)["logits"]


@pytest.fixture(scope="module")
def classification(tmp_path_factory, tiny_model_dir, sentiment_files):
  """A classification run with the Hugging Face head (BERT's pooler), exported with int8."""
  root = tmp_path_factory.mktemp("onnx_classification")
  c = _config(tiny_model_dir, *sentiment_files, "classification")
  with c.unlocked():
    c.model.pooling = "default"
    c.data.label_names = ("negative", "positive")
  workdir = _train(c, root / "run")
  export.export(workdir, str(root / "onnx"), "onnx", quantize="int8")
  return {"workdir": workdir, "out": str(root / "onnx"), "dev": sentiment_files[1]}


@pytest.fixture(scope="module")
def tagging(tmp_path_factory, tiny_model_dir):
  """A token classification run (long sentences cut into windows), exported on the command
  line (a fresh process: transformers must load with PyTorch there)."""
  root = tmp_path_factory.mktemp("onnx_tagging")
  dev = _tagged_sentences(30, 1) + _tagged_sentences(3, 2, 40, 50)
  dev_file = _write_conll(root / "dev.conll", dev)
  c = _config(tiny_model_dir, _write_conll(root / "train.conll", _tagged_sentences(160, 0)),
              dev_file, "token_classification", format="conll", max_seq_length=32)
  workdir = _train(c, root / "run")
  result = _run("jaxft.export", f"--workdir={workdir}", f"--output={root / 'onnx'}",
                "--format=onnx")
  assert result.returncode == 0, result.stderr[-3000:]
  return {"workdir": workdir, "out": str(root / "onnx"), "dev": dev_file, "log": result.stdout}


def test_classification_logits_equal_jaxfts_and_int8_stays_close(classification):
  out = classification["out"]
  names = set(os.listdir(out))
  assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer.json",
          inference.EXPORT_CONFIG_FILE} <= names
  assert not names & {"flax_model.msgpack", "model.safetensors"}  # the weights are in the graph
  fp32 = onnx_export.OnnxPredictor(os.path.join(out, "model.onnx"))
  inputs = fp32.session.get_inputs()
  assert [i.name for i in inputs] == ["input_ids", "attention_mask", "token_type_ids"]
  assert {i.type for i in inputs} == {"tensor(int64)"}
  assert all(isinstance(d, str) for i in inputs for d in i.shape)  # batch and sequence dynamic
  assert [o.name for o in fp32.session.get_outputs()] == ["logits"]
  data = fp32.read(classification["dev"])
  expected = np.stack(_jaxft_logits(classification["workdir"], data))
  got = np.stack(fp32.outputs(data)["logits"])
  assert np.abs(got - expected).max() <= 1e-4
  assert set(expected.argmax(-1)) == {0, 1}  # trained: the check compares real decisions
  assert (got.argmax(-1) == expected.argmax(-1)).all()
  int8 = np.stack(onnx_export.OnnxPredictor(os.path.join(out, "model.int8.onnx"))
                  .outputs(data)["logits"])
  assert np.abs(int8 - expected).max() < 0.1
  assert np.mean(int8.argmax(-1) == expected.argmax(-1)) >= 0.95
  assert os.path.getsize(os.path.join(out, "model.int8.onnx")) < 0.5 * os.path.getsize(
      os.path.join(out, "model.onnx"))


def test_predict_from_onnx_gives_the_workdirs_labels(classification, tmp_path):
  dev, out = classification["dev"], classification["out"]
  from_run = predict.predict(classification["workdir"], dev, str(tmp_path / "run.jsonl"))
  from_onnx = predict.predict(None, dev, str(tmp_path / "onnx.jsonl"),
                              model_folder=os.path.join(out, "model.onnx"))
  assert [r["label"] for r in from_onnx] == [r["label"] for r in from_run]
  for a, b in zip(from_run, from_onnx):
    assert a["text"] == b["text"]
    assert a["probabilities"]["positive"] == pytest.approx(b["probabilities"]["positive"],
                                                           abs=1e-5)
  # The folder means its model.onnx; the int8 file gives records of the same form.
  assert predict.predict(None, dev, str(tmp_path / "f.jsonl"), model_folder=out) == from_onnx
  int8 = predict.predict(None, dev, str(tmp_path / "int8.tsv"),
                         model_folder=os.path.join(out, "model.int8.onnx"))
  assert [set(r) for r in int8] == [set(r) for r in from_run]
  lines = (tmp_path / "int8.tsv").read_text().splitlines()
  assert lines[0] == "text\tlabel" and len(lines) == len(from_run) + 1


def test_onnx_prediction_and_evaluation_on_the_command_line(classification, tmp_path):
  out = os.path.join(classification["out"], "model.onnx")
  result = _run("jaxft.predict", f"--model={out}", f"--input={classification['dev']}",
                f"--output={tmp_path / 'p.jsonl'}")
  assert result.returncode == 0, result.stderr[-3000:]
  from_run = predict.predict(classification["workdir"], classification["dev"],
                             str(tmp_path / "run.jsonl"))
  assert (tmp_path / "p.jsonl").read_text().count("\n") == len(from_run)
  record = evaluate.evaluate_onnx(out, classification["dev"])
  gold = [line.rstrip("\n").split("\t")[1] for line in open(classification["dev"])][1:]
  accuracy = np.mean([r["label"] == ("negative", "positive")[int(g)]
                      for r, g in zip(from_run, gold)])
  assert record["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_token_classification_tags_equal_jaxft_predicts(tagging, tmp_path):
  assert "model.onnx" in tagging["log"] and "max abs logit difference" in tagging["log"]
  from_run = predict.predict(tagging["workdir"], tagging["dev"], str(tmp_path / "run.jsonl"))
  from_onnx = predict.predict(None, tagging["dev"], str(tmp_path / "onnx.jsonl"),
                              model_folder=tagging["out"])
  assert [r["words"] for r in from_onnx] == [r["words"] for r in from_run]
  assert [r["tags"] for r in from_onnx] == [r["tags"] for r in from_run]
  assert [[e["type"] for e in r["entities"]] for r in from_onnx] == [
      [e["type"] for e in r["entities"]] for r in from_run]
  record = evaluate.evaluate_onnx(tagging["out"], tagging["dev"])
  assert record["metrics"]["f1"] == pytest.approx(
      evaluate.evaluate_checkpoint(tagging["workdir"])["metrics"]["f1"], abs=1e-9)


def test_mean_pooling_run_exports_its_head(tmp_path, tiny_model_dir, sentiment_files, capsys):
  copies = [shutil.copy(f, str(tmp_path / f"{i}.tsv")) for i, f in enumerate(sentiment_files)]
  c = _config(tiny_model_dir, *copies, "classification")  # model.pooling=mean
  workdir = _train(c, tmp_path / "run")
  for path in copies:  # the run's data is gone: the export checks on its built-in samples
    os.remove(path)
  export.export(workdir, str(tmp_path / "onnx"), "onnx")
  assert "examples of built-in samples" in capsys.readouterr().out
  model = onnx_export.OnnxPredictor(str(tmp_path / "onnx" / "model.onnx"))
  data = model.read(sentiment_files[1])
  expected = np.stack(_jaxft_logits(workdir, data))
  got = np.stack(model.outputs(data)["logits"])
  assert np.abs(got - expected).max() <= 1e-4
  assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_missing_packages_are_one_line_naming_what_to_install(monkeypatch):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("onnxruntime", "torch") else
                      find_spec(name, *a))
  with pytest.raises(UserError) as error:
    onnx_export.require("--format=onnx", "torch", "onnx", "onnxruntime")
  message = str(error.value)
  assert "torch, onnxruntime" in message and 'pip install "jaxft[onnx]"' in message
  assert "download.pytorch.org/whl/cpu" in message and "\n" not in message


def test_importing_the_entry_points_loads_no_onnx_or_torch():
  code = ("import sys, jaxft.export, jaxft.predict, jaxft.evaluate, jaxft.onnx_export; "
          "print(sorted(m for m in ('torch', 'onnx', 'onnxscript', 'onnxruntime') "
          "if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.stdout.strip() == "[]", result.stderr[-2000:]
