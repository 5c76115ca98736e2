"""User mistakes at the command line: one line naming the problem, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_tsv


def _run(module, *args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_user_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("jaxft: error:")]
  assert len(lines) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.fixture
def train_args(tmp_path, tiny_model_dir, sentiment_files):
  return ["--config=configs/sst2_minilm.py", f"--workdir={tmp_path / 'run'}",
          f"--config.model.name_or_path={tiny_model_dir}",
          f"--config.data.train_file={sentiment_files[0]}",
          f"--config.data.validation_file={sentiment_files[1]}"]


def test_misspelt_config_key(train_args):
  _assert_user_error(_run("jaxft.train", *train_args, "--config.train.learning_rat=1e-4"),
                     "learning_rat")


def test_wrong_type_for_a_key(train_args):
  _assert_user_error(_run("jaxft.train", *train_args, "--config.train.batch_size=big"),
                     "batch_size")


def test_missing_data_file(train_args, tmp_path):
  _assert_user_error(
      _run("jaxft.train", *train_args, f"--config.data.train_file={tmp_path}/nope.tsv"),
      "nope.tsv does not exist")


def test_label_column_that_does_not_exist(train_args):
  _assert_user_error(_run("jaxft.train", *train_args, "--config.data.label_field=stars"),
                     "no column 'stars'", "['sentence', 'label']")


def test_zero_learning_rate(train_args):
  _assert_user_error(_run("jaxft.train", *train_args, "--config.train.learning_rate=0"),
                     "train.learning_rate")


def test_model_folder_that_does_not_exist(train_args, tmp_path):
  _assert_user_error(
      _run("jaxft.train", *train_args, f"--config.model.name_or_path={tmp_path}/no_model"),
      "is not a folder")


def test_model_folder_without_weights(train_args, tmp_path, tiny_model_dir):
  empty = tmp_path / "weightless"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(tiny_model_dir, "config.json")).read())
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
    (empty / name).write_text(open(os.path.join(tiny_model_dir, name)).read())
  _assert_user_error(_run("jaxft.train", *train_args, f"--config.model.name_or_path={empty}"),
                     "holds no weights")


def test_label_outside_label_names(train_args, tmp_path):
  path = write_tsv(tmp_path / "t.tsv", [("good", 0), ("bad", 1), ("meh", 7)])
  _assert_user_error(_run("jaxft.train", *train_args, f"--config.data.train_file={path}"),
                     "data row 3", "'7'")


def test_evaluate_without_a_run(tmp_path):
  _assert_user_error(_run("jaxft.evaluate", f"--workdir={tmp_path}"), "no config.json")


def test_debug_shows_the_traceback(train_args):
  result = _run("jaxft.train", *train_args, "--config.data.label_field=stars", "--debug")
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_config_file_that_does_not_exist(tmp_path):
  _assert_user_error(_run("jaxft.train", "--config=configs/nope.py", f"--workdir={tmp_path}"),
                     "No such file", "configs/nope.py")


def test_unknown_flag(tmp_path):
  _assert_user_error(_run("jaxft.train", "--config=configs/demo.py", f"--workdir={tmp_path}",
                          "--learning_rate=1"), "learning_rate")


def test_workdir_that_cannot_be_created(train_args, tmp_path):
  # A path under a regular file cannot be a directory, whoever runs the test (root included).
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  args = [a for a in train_args if not a.startswith("--workdir")] + [f"--workdir={blocker}/run"]
  _assert_user_error(_run("jaxft.train", *args), "is not writable")


def test_mesh_larger_than_the_device_count(train_args):
  _assert_user_error(_run("jaxft.train", *train_args, "--config.parallel.mesh.data=4"),
                     "needs 4 devices but 1 are available")


def test_global_batch_not_divisible_by_the_data_parallel_size(train_args, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  _assert_user_error(_run("jaxft.train", *train_args, "--config.train.batch_size=12"),
                     "train.batch_size=12 is not divisible by the data-parallel size 8")


def test_quantize_with_another_format_than_onnx(tmp_path):
  _assert_user_error(_run("jaxft.export", f"--workdir={tmp_path}", f"--output={tmp_path}/out",
                          "--format=hf", "--quantize=int8"),
                     "--quantize=int8 applies to --format=onnx only")


def test_onnx_model_that_does_not_exist(tmp_path):
  _assert_user_error(_run("jaxft.predict", f"--model={tmp_path}/model.onnx",
                          f"--input={tmp_path}/in.txt", f"--output={tmp_path}/out.jsonl"),
                     f"--model={tmp_path}/model.onnx does not exist")


def test_onnx_export_of_a_masked_lm_run(tmp_path):
  from jaxft import config as config_lib
  c = config_lib.base_config()
  c.task.kind = "mlm"
  (tmp_path / "config.json").write_text(config_lib.to_json(c))  # checked before any restore
  _assert_user_error(_run("jaxft.export", f"--workdir={tmp_path}", f"--output={tmp_path}/out",
                          "--format=onnx"), "task.kind=mlm is not supported")
