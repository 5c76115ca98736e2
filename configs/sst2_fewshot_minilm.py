"""SST-2 from 8 examples per label: SetFit's contrastive method with the default model.

  python -m jaxft.train --config=configs/sst2_fewshot_minilm.py --workdir=runs/sst2_8shot \
    --config.data.train_file=../shared/data/sst2/train.tsv \
    --config.data.validation_file=../shared/data/sst2/dev.tsv

The encoder learns from 20 x 16 positive and as many negative sentence pairs (cosine
similarity 1 or 0); then a logistic regression on its mean-pooled embeddings, plus the head
that picks the most similar label description, becomes the head. The hyperparameters are the
setfit library's (body learning rate 2e-5, batch 16, one epoch, 20 iterations), so that
benchmarks/fewshot.py compares like with like (results in benchmarks/README.md). Other
subsets: data.examples_per_class and data.few_shot_seed.
"""

import os

from jaxft.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(__file__), "sst2_minilm.py"))
  with c.unlocked():
    c.data.examples_per_class = 8
    # A zero-shot prior added to the fitted head (jaxft/fewshot.py)
    c.data.label_descriptions = {"negative": "a negative review",
                                 "positive": "a positive review"}
    c.train.method = "contrastive"
    c.train.contrastive.num_iterations = 20
    c.train.learning_rate = 2e-5
  return c
