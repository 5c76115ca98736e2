"""SST-2 with no training example: each sentence gets the label whose description its
embedding is most similar to (cosine similarity, the default model's mean pooling).

  python -m jaxft.train --config=configs/sst2_zeroshot_minilm.py --workdir=runs/sst2_zero \
    --config.data.validation_file=../shared/data/sst2/dev.tsv

The run saves the description head as checkpoint step 0, so jaxft-eval, jaxft-predict and
jaxft-export use it like any trained run.
"""

import os

from jaxft.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(__file__), "sst2_minilm.py"))
  with c.unlocked():
    c.data.label_descriptions = {"negative": "a negative review",
                                 "positive": "a positive review"}
    c.train.method = "zero_shot"
  return c
