"""SST-2 with a parameter-efficient method on the default model: pick it on the command line.

  python -m jaxft.train --config=configs/sst2_minilm_peft.py --workdir=runs/sst2_ia3 \
    --config.peft.method=ia3 --config.train.learning_rate=1e-2 \
    --config.data.train_file=../shared/data/sst2/train.tsv \
    --config.data.validation_file=../shared/data/sst2/dev.tsv

configs/sst2_minilm.py's data, batch size and schedule, with the method's own learning rate
(benchmarks/peft_methods.py's sweep: the rates and scores are in benchmarks/README.md).
"""

import os

from jaxft.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "sst2_minilm.py"))
  with c.unlocked():
    c.peft.method = "ia3"
    c.train.learning_rate = 1e-2
  c.lock()
  return c
