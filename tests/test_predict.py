"""jaxft.predict agrees with evaluation, from checkpoints and from exported folders."""

import json
import os

import numpy as np
import pytest

from jaxft import evaluate, export, inference, predict, train
from jaxft.errors import UserError

from test_tasks import _config, _tagged_sentences, _write_conll


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory, tiny_model_dir, sentiment_files):
  from jaxft.config import base_config
  c = base_config()
  c.model.name_or_path, c.model.pooling = tiny_model_dir, "mean"
  c.data.train_file, c.data.validation_file = sentiment_files
  c.data.max_seq_length = 64
  c.data.label_names = ("negative", "positive")
  c.train.batch_size, c.train.eval_batch_size, c.train.learning_rate = 16, 32, 3e-3
  c.train.num_epochs, c.checkpoint.async_save = 4.0, False
  c.lock()
  workdir = str(tmp_path_factory.mktemp("sentiment_run"))
  train.train_and_evaluate(c, workdir)
  return workdir


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_plain_text_predictions_match_evaluation_on_every_example(sentiment_run, sentiment_files,
                                                                 tmp_path):
  record = evaluate.evaluate_checkpoint(sentiment_run, "best")
  evaluated = _read_jsonl(os.path.join(
      sentiment_run, "eval", f"validation-step{record['step']}-predictions.jsonl"))
  rows = [line.rstrip("\n").split("\t") for line in open(sentiment_files[1])][1:]
  text_file = tmp_path / "dev.txt"
  text_file.write_text("".join(sentence + "\n" for sentence, _ in rows))
  out = predict.predict(sentiment_run, str(text_file), str(tmp_path / "p.jsonl"))
  assert len(out) == len(rows) == len(evaluated)
  assert [r["label"] for r in out] == [r["label"] for r in evaluated]
  assert [r["text"] for r in out] == [s for s, _ in rows]
  gold = ["negative", "positive"]
  accuracy = np.mean([r["label"] == gold[int(label)] for r, (_, label) in zip(out, rows)])
  assert accuracy == pytest.approx(record["metrics"]["accuracy"], abs=1e-9)
  for r in out:
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
  assert _read_jsonl(tmp_path / "p.jsonl") == out


def test_exported_folder_predicts_like_the_checkpoint(sentiment_run, sentiment_files, tmp_path):
  export.export(sentiment_run, str(tmp_path / "hf"), "hf")
  from_ckpt = predict.predict(sentiment_run, sentiment_files[1], str(tmp_path / "a.tsv"))
  from_export = predict.predict(None, sentiment_files[1], str(tmp_path / "b.jsonl"),
                                model_folder=str(tmp_path / "hf"))
  assert [r["label"] for r in from_export] == [r["label"] for r in from_ckpt]
  for a, b in zip(from_ckpt, from_export):
    assert a["probabilities"]["positive"] == pytest.approx(b["probabilities"]["positive"],
                                                           abs=1e-5)
  lines = (tmp_path / "a.tsv").read_text().splitlines()
  assert lines[0] == "text\tlabel" and len(lines) == len(from_ckpt) + 1


def test_input_without_the_training_text_fields_is_one_clear_line(sentiment_run, tmp_path):
  # In process: every UserError leaves the entry points as one line and exit 2 (test_cli.py).
  bad = tmp_path / "bad.tsv"
  bad.write_text("review\tstars\ngood film\t5\n")
  with pytest.raises(UserError) as error:
    predict.predict(sentiment_run, str(bad), str(tmp_path / "out.jsonl"))
  message = str(error.value)
  assert "has columns ['review', 'stars'] but the model reads ['sentence']" in message
  assert "\n" not in message
  assert not (tmp_path / "out.jsonl").exists()
  pairs = tmp_path / "pairs.txt"  # plain text with a tab where one field is expected
  pairs.write_text("good film\n" "a\tb\n")
  with pytest.raises(UserError, match="line 2 has 2 tab-separated field"):
    predict.predict(sentiment_run, str(pairs), str(tmp_path / "out.jsonl"))


def test_ner_spans_score_like_evaluation(tiny_model_dir, tmp_path):
  from seqeval.metrics import f1_score
  dev = _tagged_sentences(40, 1) + _tagged_sentences(3, 2, 40, 50)
  dev_file = _write_conll(tmp_path / "dev.conll", dev)
  c = _config(tiny_model_dir, _write_conll(tmp_path / "train.conll", _tagged_sentences(160, 0)),
              dev_file, "token_classification", format="conll", max_seq_length=32)
  with c.unlocked():
    c.train.num_epochs = 1.5  # not converged: some entities are wrong, which the check needs
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir)
  record = evaluate.evaluate_checkpoint(workdir, "best")
  out = predict.predict(workdir, dev_file, str(tmp_path / "spans.jsonl"))
  assert [r["words"] for r in out] == [w for w, _ in dev]
  # Spans back to BIO tags, scored against the gold file.
  predicted = []
  for r in out:
    tags = ["O"] * len(r["words"])
    for e in r["entities"]:
      tags[e["start"]] = "B-" + e["type"]
      for k in range(e["start"] + 1, e["end"]):
        tags[k] = "I-" + e["type"]
      assert e["text"] == " ".join(r["words"][e["start"]:e["end"]]) and 0 < e["score"] <= 1
    predicted.append(tags)
  gold = [t for _, t in dev]
  assert f1_score(gold, predicted) == pytest.approx(record["metrics"]["f1"], abs=1e-9)
  assert 0.2 < record["metrics"]["f1"] < 1.0
  # TSV output is CoNLL: word<TAB>tag per line, a blank line between sentences.
  predict.predict(workdir, dev_file, str(tmp_path / "tags.tsv"))
  blocks = (tmp_path / "tags.tsv").read_text().strip("\n").split("\n\n")
  assert len(blocks) == len(dev)
  assert [line.split("\t")[0] for line in blocks[-1].splitlines()] == dev[-1][0]


def test_prediction_needs_exactly_one_source(tmp_path):
  with pytest.raises(UserError, match="exactly one of --workdir"):
    inference.load(None, None, "best")
