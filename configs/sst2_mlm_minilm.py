"""Masked-LM domain adaptation: continue pretraining the default model on SST-2's sentences.

  python -m jaxft.train --config=configs/sst2_mlm_minilm.py --workdir=runs/sst2_mlm \
    --config.data.train_file=../shared/data/sst2/train.tsv \
    --config.data.validation_file=../shared/data/sst2/dev.tsv
  python -m jaxft.export --workdir=runs/sst2_mlm --output=runs/sst2_mlm/hf --format=hf
  python -m jaxft.train --config=configs/sst2_minilm.py --workdir=runs/sst2_adapted \
    --config.model.name_or_path=runs/sst2_mlm/hf --config.data.train_file=...

Text comes from a column (here `sentence`; labels are ignored) or from plain text files
(`data.format=text`, one example per line). 15% of tokens are masked (80% [MASK], 10% random,
10% kept), redrawn every epoch; validation uses one fixed draw, so its perplexity is comparable
between evaluations. The default model ships without an MLM head (it is a sentence embedder):
the head's transform starts fresh, tied to the word embeddings.
"""

from jaxft.config import base_config


def get_config():
  c = base_config()
  c.task.kind = "mlm"
  c.task.mlm_probability = 0.15
  c.model.name_or_path = "minilm"
  c.data.text_fields = ("sentence",)
  c.data.max_seq_length = 64
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.learning_rate = 1e-4
  c.train.num_train_steps = 300
  c.train.eval_every = 100
  c.train.warmup_ratio = 0.06
  c.checkpoint.best_metric = "perplexity"
  c.lock()
  return c
