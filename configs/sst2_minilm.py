"""SST-2 (binary sentiment) with the embedded default model, all-MiniLM-L6-v2.

  python -m jaxft.train --config=configs/sst2_minilm.py --workdir=runs/sst2 \
    --config.data.train_file=../shared/data/sst2/train.tsv \
    --config.data.validation_file=../shared/data/sst2/dev.tsv

Why these defaults: the model was trained as a sentence embedder with mean pooling, so a mean-pooled
head starts from a far better sentence representation than BERT's pooler; short sentences (13
word pieces on average) need little sequence length; a higher learning rate than BERT-base's usual
2e-5 suits this small model and short runs.
"""

from jaxft.config import base_config


def get_config():
  c = base_config()
  c.model.name_or_path = "minilm"
  c.model.pooling = "mean"
  c.data.text_fields = ("sentence",)
  c.data.label_field = "label"
  c.data.label_names = ("negative", "positive")  # the file's labels 0/1 are indices into these
  c.data.max_seq_length = 128
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4
  c.train.num_epochs = 1.0
  c.train.warmup_ratio = 0.1
  c.train.weight_decay = 0.01
  c.checkpoint.best_metric = "accuracy"
  c.lock()
  return c
