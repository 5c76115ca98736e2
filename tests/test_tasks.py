"""Every task kind through the same train step, evaluation and checkpoints, on the tiny model.

The synthetic data is built so that the right answer is learnable from the words alone; the
thresholds are what the tiny model reaches with margin in a few seconds of training.
"""

import json
import os
import random

import numpy as np
import pytest

from jaxft import evaluate, metrics as metrics_lib, train
from jaxft.data import encode, tokens
from jaxft.errors import UserError

from conftest import FILLER, NEGATIVE, POSITIVE

TOPICS = {"sport": ["football", "tennis", "goal", "match"],
          "food": ["pizza", "bread", "cheese", "soup"],
          "music": ["guitar", "song", "piano", "concert"]}
FIRST_NAMES = ["john", "mary", "peter", "anna", "james"]
SURNAMES = ["smith", "jones", "brown", "miller"]
PLACES = ["paris", "london", "berlin", "rome"]


def _config(tiny_model_dir, train_file, dev_file, kind, **data_keys):
  from jaxft.config import base_config
  c = base_config()
  c.task.kind = kind
  c.model.name_or_path = tiny_model_dir
  c.data.train_file, c.data.validation_file = train_file, dev_file
  c.data.max_seq_length = 64
  c.model.pooling = "mean" if kind in ("classification", "regression", "multilabel") else "default"
  c.train.batch_size, c.train.eval_batch_size = 16, 32
  c.train.learning_rate, c.train.warmup_ratio = 3e-3, 0.0
  c.train.num_epochs, c.train.log_every = 8.0, 8
  c.checkpoint.async_save = False
  for key, value in data_keys.items():
    c.data[key] = value
  c.lock()
  return c


# ---- regression (sentence pairs) -------------------------------------------------------------
def _scored_pairs(n, seed):
  """Pairs with one sentiment word per sentence; the score (0, 2.5 or 5) counts the positive."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    halves, score = [], 0.0
    for _ in range(2):
      positive = rng.random() < 0.5
      score += 2.5 * positive
      words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
      words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
      halves.append(" ".join(words))
    rows.append((*halves, f"{score:.1f}"))
  return rows


def _write(path, header, rows):
  with open(path, "w") as f:
    f.write("\t".join(header) + "\n")
    f.writelines("\t".join(r) + "\n" for r in rows)
  return str(path)


def test_regression_on_sentence_pairs_learns_the_score(tiny_model_dir, tmp_path):
  header = ("sentence1", "sentence2", "score")
  c = _config(tiny_model_dir, _write(tmp_path / "train.tsv", header, _scored_pairs(192, 0)),
              _write(tmp_path / "dev.tsv", header, _scored_pairs(64, 1)), "regression",
              text_fields=("sentence1", "sentence2"), label_field="score")
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(c, workdir)
  assert final["pearson"] > 0.9 and final["spearman"] > 0.85
  assert final["mse"] == pytest.approx(final["loss"])
  assert json.load(open(os.path.join(workdir, "run.json")))["best_metric"] == "pearson"
  record = evaluate.evaluate_checkpoint(workdir, "best")
  best = max(r["pearson"] for r in _validation(workdir))
  assert record["metrics"]["pearson"] == pytest.approx(best, abs=1e-6)


def _validation(workdir):
  from jaxft.metrics import read_metrics
  return read_metrics(workdir, "validation")


# ---- multilabel --------------------------------------------------------------------------------
def _topic_rows(n, seed):
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    chosen = sorted(rng.sample(sorted(TOPICS), rng.randint(1, 2)))
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 5))]
    words += [rng.choice(TOPICS[t]) for t in chosen]
    rng.shuffle(words)
    rows.append({"text": " ".join(words), "topics": chosen})
  return rows


def test_multilabel_reaches_its_expected_metrics(tiny_model_dir, tmp_path):
  train_rows, dev_rows = _topic_rows(192, 0), _topic_rows(64, 1)
  # Training labels as a delimited string (TSV), validation labels as JSON lists.
  train_file = _write(tmp_path / "train.tsv", ("text", "topics"),
                      [(r["text"], ",".join(r["topics"])) for r in train_rows])
  dev_file = str(tmp_path / "dev.jsonl")
  with open(dev_file, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in dev_rows)
  c = _config(tiny_model_dir, train_file, dev_file, "multilabel", text_fields=("text",),
              label_field="topics")
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert final["micro_f1"] > 0.95 and final["macro_f1"] > 0.95
  assert final["exact_match"] > 0.85
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["data"]["label_names"] == ["food", "music", "sport"]


# ---- token classification --------------------------------------------------------------------
def _tagged_sentences(n, seed, min_words=3, max_words=10):
  """Sentences of filler with two-word person names (first name, surname) and places."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words, tags = [], []
    while len(words) < rng.randint(min_words, max_words):
      r = rng.random()
      if r < 0.15:
        words += [rng.choice(FIRST_NAMES), rng.choice(SURNAMES)]
        tags += ["B-PER", "I-PER"]
      elif r < 0.3:
        words.append(rng.choice(PLACES))
        tags.append("B-LOC")
      else:
        words.append(rng.choice(FILLER))
        tags.append("O")
    out.append((words, tags))
  return out


def _write_conll(path, sentences, sep=" "):
  with open(path, "w") as f:
    f.write("-DOCSTART- -X- -X- O\n\n")
    for words, tags in sentences:
      f.writelines(f"{w}{sep}NN{sep}O{sep}{t}\n" for w, t in zip(words, tags))
      f.write(" \n" if sep == "\t" else "\n")  # whitespace-only lines end sentences too
  return str(path)


def test_token_classification_learns_entities_and_scores_every_one(tiny_model_dir, tmp_path):
  train_file = _write_conll(tmp_path / "train.conll", _tagged_sentences(160, 0))
  dev = _tagged_sentences(40, 1) + _tagged_sentences(4, 2, 40, 50)  # long ones need windows
  dev_file = _write_conll(tmp_path / "dev.conll", dev, sep="\t")
  c = _config(tiny_model_dir, train_file, dev_file, "token_classification", format="conll",
              max_seq_length=32, window_overlap=8)
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(c, workdir)
  assert final["f1"] > 0.9 and final["token_accuracy"] > 0.95
  gold_entities = sum(t.startswith("B-") for _, tags in dev for t in tags)
  assert sum(r["support"] for r in final["per_type"].values()) == gold_entities
  assert set(final["per_type"]) == {"PER", "LOC"}
  record = evaluate.evaluate_checkpoint(workdir, "best")
  assert record["metrics"]["f1"] == pytest.approx(
      max(r["f1"] for r in _validation(workdir)), abs=1e-6)


def test_windows_score_every_word_once_with_left_context(minilm_dir):
  from jaxft import models
  tokenizer = models.load_tokenizer(minilm_dir, words_given=True)
  words = [["w%d" % i for i in range(60)] + ["\u200b", "end"]]  # "\u200b" tokenizes to nothing
  names = ("B-X", "I-X", "O")
  tag_ids = [np.array([i % 3 for i in range(len(words[0]))], np.int32)]
  ids, _, labels, weights, window_sentence, position_word = tokens.encode_windows(
      tokenizer, words, tag_ids, names, max_seq_length=24, overlap=6, label_all_subtokens=False)
  assert len(ids) > 3 and all(len(x) <= 24 for x in ids)
  scored = np.concatenate([p[p >= 0] for p in position_word])
  assert sorted(scored.tolist()) == list(range(len(words[0])))  # each word exactly once
  assert sum(float(w.sum()) for w in weights) == len(words[0])
  for x, p in zip(ids[1:], position_word[1:]):  # later windows start with unscored context
    assert p[1] == -1 and x[0] == tokenizer.cls_token_id
  # The label on each scored first piece is that word's tag.
  for lab, p in zip(labels, position_word):
    np.testing.assert_array_equal(lab[p >= 0], tag_ids[0][p[p >= 0]])
  # label_all_subtokens: later pieces of a B- word carry I-.
  assert tokens.inside_tag_ids(names).tolist() == [1, 1, 2]


def test_token_files_from_jsonl_and_saved_datasets_read_alike(minilm_dir, tmp_path):
  import datasets
  from jaxft import models
  from jaxft.config import base_config
  sentences = _tagged_sentences(5, 3)
  path = str(tmp_path / "ner.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps({"tokens": w, "ner_tags": t}) + "\n" for w, t in sentences)
  names = ["O", "B-PER", "I-PER", "B-LOC"]
  ds = datasets.Dataset.from_dict(
      {"tokens": [w for w, _ in sentences], "ner_tags": [[names.index(x) for x in t]
                                                         for _, t in sentences]},
      features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(
                                      names=names))}))
  ds.save_to_disk(str(tmp_path / "saved"))
  c = base_config()
  c.task.kind, c.data.text_fields, c.data.label_field = "token_classification", ("tokens",), \
      "ner_tags"
  tokenizer = models.load_tokenizer(minilm_dir, words_given=True)
  a, names_a = encode.read_split(path, c, tokenizer, None, None)
  b, names_b = encode.read_split(str(tmp_path / "saved"), c, tokenizer, None, None)
  assert names_a == names_b
  assert a.words.tags == b.words.tags == [t for _, t in sentences]
  for x, y in zip(a.labels, b.labels):
    np.testing.assert_array_equal(x, y)


# ---- masked LM ---------------------------------------------------------------------------------
def test_mlm_lowers_validation_perplexity_and_masks_are_deterministic(tiny_model_dir, tmp_path):
  from conftest import synthetic_sentiment
  train_file = tmp_path / "train.txt"
  train_file.write_text("\n".join(s for s, _ in synthetic_sentiment(256, 0)) + "\n\n")
  dev_file = tmp_path / "dev.txt"
  dev_file.write_text("\n".join(s for s, _ in synthetic_sentiment(64, 1)))
  c = _config(tiny_model_dir, str(train_file), str(dev_file), "mlm", text_fields=("text",))
  with c.unlocked():
    c.train.num_epochs, c.train.eval_every = 6.0, 16
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir)
  ppl = [r["perplexity"] for r in _validation(workdir)]
  assert ppl[-1] < 0.5 * ppl[0], ppl  # from the untrained MLM head's level down
  assert json.load(open(os.path.join(workdir, "run.json")))["best_mode"] == "min"
  # Evaluating the checkpoint redraws the same evaluation masks: the same perplexity.
  record = evaluate.evaluate_checkpoint(workdir, "best")
  assert record["metrics"]["perplexity"] == pytest.approx(min(ppl), rel=1e-5)


def test_mlm_masking_follows_bert_recipe():
  from jaxft.data import mlm
  ids = np.arange(1000, 1000 + 64 * 128).reshape(64, 128).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "weights": np.ones(64, np.float32), "index": np.arange(64)}
  out = mlm.mask_tokens(batch, 0, 0, 0.15, 103, 30522, [101, 102, 0])
  chosen = out["label_weights"] > 0
  assert not chosen[:, 0].any() and not chosen[:, -1].any()  # special tokens never
  assert abs(chosen.mean() - 0.15 * 126 / 128) < 0.01
  masked = out["input_ids"][chosen] == 103
  kept = out["input_ids"][chosen] == ids[chosen]
  assert abs(masked.mean() - 0.8) < 0.03 and abs(kept.mean() - 0.1) < 0.03
  np.testing.assert_array_equal(out["labels"], ids)
  again = mlm.mask_tokens(batch, 0, 0, 0.15, 103, 30522, [101, 102, 0])
  np.testing.assert_array_equal(again["input_ids"], out["input_ids"])  # resumable
  other = mlm.mask_tokens(batch, 0, 1, 0.15, 103, 30522, [101, 102, 0])
  assert (other["label_weights"] != out["label_weights"]).any()  # redrawn every epoch
  # An example is masked alike wherever it sits: row 5 moved to row 0 of another batch.
  moved = mlm.mask_tokens({k: v[5:6] for k, v in batch.items()}, 0, 0, 0.15, 103, 30522,
                          [101, 102, 0])
  np.testing.assert_array_equal(moved["input_ids"][0], out["input_ids"][5])


# ---- wrong kind for the data -------------------------------------------------------------------
@pytest.mark.parametrize("kind,rows,message", [
    ("classification", [("a b", "1"), ("c d", "2.5")],
     r"data row 2: label '2.5' is a number but not an integer.*task.kind=regression"),
    ("regression", [("a b", "1.5"), ("c d", "high")],
     r"data row 2: regression target 'high' is not a number"),
])
def test_labels_that_do_not_fit_the_task_name_the_row(minilm_dir, tmp_path, kind, rows, message):
  from jaxft import models
  from jaxft.config import base_config
  c = base_config()
  c.task.kind = kind
  path = _write(tmp_path / "d.tsv", ("sentence", "label"), rows)
  with pytest.raises(UserError, match=message):
    encode.read_split(path, c, models.load_tokenizer(minilm_dir), None, None)


def test_a_tag_outside_the_training_tags_names_sentence_and_line(minilm_dir, tmp_path):
  from jaxft import models
  from jaxft.config import base_config
  c = base_config()
  c.task.kind, c.data.format = "token_classification", "conll"
  path = _write_conll(tmp_path / "dev.conll", [(["a", "b"], ["O", "O"]),
                                               (["john", "x"], ["B-PER", "B-ORG"])])
  with pytest.raises(UserError, match=r"sentence 2 \(line 7\): tag 'B-ORG' is not one of"):
    encode.read_split(path, c, models.load_tokenizer(minilm_dir, words_given=True),
                      ("O", "B-PER", "I-PER"), None)


@pytest.mark.parametrize("num_labels, case", [(2, "random"), (3, "random"), (5, "random"),
                                               (3, "one class never predicted"),
                                               (2, "constant prediction"), (4, "all right")])
def test_classification_metrics_match_scikit_learn(num_labels, case):
  """The confusion-matrix metrics give scikit-learn's numbers (which they replace: importing
  sklearn.metrics cost ~1 s of every evaluation)."""
  from sklearn import metrics as skm
  rng = np.random.default_rng(num_labels)
  labels = rng.integers(0, num_labels, 300)
  predictions = np.where(rng.random(300) < 0.7, labels, rng.integers(0, num_labels, 300))
  if case == "one class never predicted":
    predictions = np.where(predictions == 2, 0, predictions)
  elif case == "constant prediction":
    predictions = np.ones_like(labels)
  elif case == "all right":
    predictions = labels.copy()
  got = metrics_lib.classification_metrics(labels, predictions, num_labels)
  every = list(range(num_labels))
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
  assert got["macro_f1"] == pytest.approx(skm.f1_score(
      labels, predictions, average="macro", labels=every, zero_division=0), abs=1e-12)
  assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, predictions), abs=1e-12)
  if num_labels == 2:
    assert got["binary_f1"] == pytest.approx(skm.f1_score(labels, predictions, zero_division=0),
                                             abs=1e-12)
  assert got["confusion_matrix"] == skm.confusion_matrix(labels, predictions,
                                                         labels=every).tolist()
