"""The quickstart: fine-tune the default model on the bundled SST-2 sample (configs/demo_data).

  python -m jaxft.train --config=configs/demo.py --workdir=runs/demo
  python -m jaxft.evaluate --workdir=runs/demo --checkpoint=best
"""

import os

from jaxft.config import base_config

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", "sst2")


def get_config():
  c = base_config()
  c.model.name_or_path = "minilm"
  c.model.pooling = "mean"
  c.data.train_file = os.path.join(_DATA, "train.tsv")
  c.data.validation_file = os.path.join(_DATA, "dev.tsv")
  c.data.text_fields = ("sentence",)
  c.data.label_field = "label"
  c.data.label_names = ("negative", "positive")
  c.data.max_seq_length = 64
  c.train.batch_size = 32
  c.train.learning_rate = 1e-4
  c.train.num_epochs = 1.0
  c.train.eval_every = 16
  c.train.log_every = 4
  c.lock()
  return c
