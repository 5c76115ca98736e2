"""Shared fixtures: a tiny random BERT folder, small synthetic data files, config builders."""

from __future__ import annotations

import os
import random
import shutil

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

POSITIVE = ["good", "great", "wonderful", "superb", "lovely", "fine", "excellent", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "dull", "boring", "poor", "horrible", "weak"]
FILLER = ["the", "movie", "was", "plot", "actors", "a", "story", "really", "quite", "and", "it"]


def synthetic_sentiment(n: int, seed: int) -> list[tuple[str, int]]:
  """Sentences whose label is told by one sentiment word among filler, of varied lengths."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    label = rng.randint(0, 1)
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 8))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    rows.append((" ".join(words), label))
  return rows


def write_tsv(path, rows, header=("sentence", "label")) -> str:
  with open(path, "w", encoding="utf-8") as f:
    if header:
      f.write("\t".join(header) + "\n")
    for row in rows:
      f.write("\t".join(str(x) for x in row) + "\n")
  return str(path)


@pytest.fixture(scope="session")
def minilm_dir():
  from jaxft import models
  return models.resolve_model_dir("minilm")


def make_tiny_model(out, minilm_dir, dropout: float = 0.0) -> str:
  """A 2-layer, 32-wide random BERT with the default model's tokenizer, saved as Flax msgpack
  and as PyTorch-layout safetensors (dropout off unless asked for)."""
  from transformers import BertConfig, FlaxBertModel
  os.makedirs(out, exist_ok=True)
  config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
  model = FlaxBertModel(config, seed=0)
  model.save_pretrained(out)
  _save_pytorch_layout(model.params, os.path.join(out, "model.safetensors"))
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir, name), out)
  return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
  return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"), minilm_dir)


def _save_pytorch_layout(params, path):
  """A BERT base model's weights as PyTorch would save them (for torch/peft interop tests)."""
  from flax import traverse_util
  from safetensors.numpy import save_file
  from jaxft.export import to_pytorch_names
  names = to_pytorch_names(traverse_util.flatten_dict(params))
  save_file({f"bert.{k}": v for k, v in names.items()}, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("sentiment")
  return (write_tsv(d / "train.tsv", synthetic_sentiment(192, 0)),
          write_tsv(d / "dev.tsv", synthetic_sentiment(70, 1)))


@pytest.fixture
def tiny_config(tiny_model_dir, sentiment_files):
  """A locked config training the tiny model on the synthetic sentiment files."""
  from jaxft.config import base_config
  c = base_config()
  c.model.name_or_path = tiny_model_dir
  c.data.train_file, c.data.validation_file = sentiment_files
  c.data.max_seq_length = 64
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.model.pooling = "mean"  # a random tiny BERT learns far faster through mean pooling
  c.train.learning_rate = 3e-3
  c.train.warmup_ratio = 0.0
  c.train.num_epochs = 8.0  # compiling dominates; 96 tiny steps cost about what 24 do
  c.train.max_grad_norm = 1.0
  c.train.log_every = 12
  c.checkpoint.async_save = False
  c.lock()
  return c


def write_config_file(path, model_dir, train_file, dev_file, **train_keys) -> str:
  """A config file (for the command line) training the tiny model; train.* keys as given."""
  settings = {"batch_size": 16, "eval_batch_size": 32, "learning_rate": 3e-3, "log_every": 1,
              **train_keys}
  lines = "".join(f"  c.train.{k} = {v!r}\n" for k, v in settings.items())
  path.write_text(
      "from jaxft.config import base_config\n"
      "def get_config():\n"
      "  c = base_config()\n"
      f"  c.model.name_or_path = {model_dir!r}\n"
      "  c.model.pooling = 'mean'\n"
      f"  c.data.train_file, c.data.validation_file = {train_file!r}, {dev_file!r}\n"
      "  c.data.max_seq_length = 64\n"
      f"{lines}"
      "  c.lock()\n"
      "  return c\n")
  return str(path)
