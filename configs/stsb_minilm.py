"""STS-B (GLUE sentence-pair similarity, a 0-5 score): regression with the default model.

  python -m jaxft.train --config=configs/stsb_minilm.py --workdir=runs/stsb \
    --config.data.train_file=../shared/data/stsb/train.tsv \
    --config.data.validation_file=../shared/data/stsb/dev.tsv

The pair is encoded together (cross-encoder: [CLS] a [SEP] b [SEP]); the mean of the last hidden
states feeds a one-output dense head trained with MSE, whose bias starts at the mean training
score. Reported: pearson, spearman, mse.
"""

from jaxft.config import base_config


def get_config():
  c = base_config()
  c.task.kind = "regression"
  c.model.name_or_path = "minilm"
  c.model.pooling = "mean"
  c.data.text_fields = ("sentence1", "sentence2")
  c.data.label_field = "score"
  c.data.max_seq_length = 128
  c.train.batch_size = 16
  c.train.learning_rate = 1e-4
  c.train.num_epochs = 3.0
  c.train.warmup_ratio = 0.1
  c.checkpoint.best_metric = "pearson"
  c.lock()
  return c
