"""RTE (GLUE textual entailment): sentence-pair classification with the default model.

  python -m jaxft.train --config=configs/rte_minilm.py --workdir=runs/rte \
    --config.data.train_file=../shared/data/rte/train.tsv \
    --config.data.validation_file=../shared/data/rte/dev.tsv

Labels are the strings entailment / not_entailment. Premises are long: max_seq_length 256.
"""

from jaxft.config import base_config


def get_config():
  c = base_config()
  c.task.kind = "classification"
  c.model.name_or_path = "minilm"
  c.model.pooling = "mean"
  c.data.text_fields = ("sentence1", "sentence2")
  c.data.label_field = "label"
  c.data.max_seq_length = 256
  c.train.batch_size = 16
  c.train.learning_rate = 5e-5
  c.train.num_epochs = 3.0
  c.train.warmup_ratio = 0.1
  c.checkpoint.best_metric = "accuracy"
  c.lock()
  return c
