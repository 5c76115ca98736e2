"""WNUT-17 emerging-entity NER on social media (6 types, BIO tags) with the default model.

  python -m jaxft.train --config=configs/wnut17_minilm.py --workdir=runs/wnut17 \
    --config.data.train_file=../shared/data/wnut17/wnut17train.conll \
    --config.data.validation_file=../shared/data/wnut17/emerging.dev.conll

Files: `token<TAB>tag`; lines holding only whitespace end sentences. A token that the tokenizer
turns into nothing (the dev file holds a zero-width space) is read as [UNK], so it keeps its tag.
"""

from jaxft.config import base_config


def get_config():
  c = base_config()
  c.task.kind = "token_classification"
  c.model.name_or_path = "minilm"
  c.data.format = "conll"
  c.data.token_column = 0
  c.data.tag_column = -1
  c.data.max_seq_length = 128
  c.train.batch_size = 16
  c.train.eval_batch_size = 64
  c.train.learning_rate = 2e-4
  c.train.num_epochs = 3.0
  c.train.warmup_ratio = 0.1
  c.checkpoint.best_metric = "f1"
  c.lock()
  return c
