"""SST-2 with LoRA (rank 8 on every linear layer of the encoder) on the default model.

  python -m jaxft.train --config=configs/sst2_minilm_lora.py --workdir=runs/sst2_lora \
    --config.data.train_file=../shared/data/sst2/train.tsv \
    --config.data.validation_file=../shared/data/sst2/dev.tsv
  python -m jaxft.export --workdir=runs/sst2_lora --output=runs/sst2_lora_model --format=hf

Why these choices (benchmarks/peft_methods.py's sweep, in benchmarks/README.md): the default model is a
sentence embedder, so its mean-pooled states are a far better start than BERT's pooler, which
LoRA leaves frozen (rank 8 on query and value through the pooler head scored 0.790 where full
fine-tuning scores 0.825); every linear layer adapts more than query and value alone at 1.5% of
the parameters. A mean-pooled run exports merged (--format=hf); for an adapter the PEFT library
loads (--format=peft), set model.pooling=default.
"""

import os

from jaxft.config import load_config_file


def full_fine_tuning():
  """configs/sst2_minilm.py, loaded by path so that this file works from any directory."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "sst2_minilm.py"))


def get_config():
  c = full_fine_tuning()
  with c.unlocked():
    c.peft.method = "lora"
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    c.peft.lora.targets = "all-linear"
    c.train.learning_rate = 1e-3
  c.lock()
  return c
