"""CoNLL-2003 English NER (PER, LOC, ORG, MISC; BIO tags) with the default model.

  python -m jaxft.train --config=configs/conll03_minilm.py --workdir=runs/conll03 \
    --config.data.train_file=../shared/data/conll2003/train.txt \
    --config.data.validation_file=../shared/data/conll2003/valid.txt

Files: `token POS chunk NER` per line, blank lines between sentences, -DOCSTART- lines skipped.
Scores are entity-level (seqeval, conlleval conventions) over every sentence of the file: long
sentences are split into windows, never truncated. The default model is uncased, so it cannot
use capitalisation, the strongest NER cue in news text: expect less than a cased model.
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
