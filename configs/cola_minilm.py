"""CoLA (GLUE grammatical acceptability): classification selected by Matthews correlation.

  python -m jaxft.train --config=configs/cola_minilm.py --workdir=runs/cola \
    --config.data.train_file=../shared/data/cola/train.tsv \
    --config.data.validation_file=../shared/data/cola/dev.tsv

The files have no header: columns source, label (0/1), author's mark, sentence. The classes are
unbalanced (70% acceptable), so MCC, not accuracy, picks the best checkpoint.
"""

from jaxft.config import base_config


def get_config():
  c = base_config()
  c.task.kind = "classification"
  c.model.name_or_path = "minilm"
  c.model.pooling = "mean"
  c.data.has_header = False
  c.data.column_names = ("source", "label", "author_mark", "sentence")
  c.data.text_fields = ("sentence",)
  c.data.label_field = "label"
  c.data.label_names = ("unacceptable", "acceptable")
  c.data.max_seq_length = 64
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4
  c.train.num_epochs = 1.0
  c.train.warmup_ratio = 0.1
  c.checkpoint.best_metric = "mcc"
  c.lock()
  return c
