"""SST-2: distil a fine-tuned default model (the teacher) into a 3-layer student.

  jaxft-train --config=configs/sst2_minilm.py --workdir=runs/teacher ...data flags...
  jaxft-export --workdir=runs/teacher --output=runs/teacher-hf
  jaxft-train --config=configs/sst2_distill_minilm.py --workdir=runs/student \
    --config.model.name_or_path=runs/teacher-hf --config.train.distill.teacher=runs/teacher-hf \
    --config.train.distill.transfer_file=UNLABELLED.tsv ...data flags...

The student starts as the teacher's layers 0, 2 and 4 (embeddings and head included), the
DistilBERT recipe, and learns from the labels and the teacher's softened probabilities; the
unlabelled transfer sentences (optional, a `sentence` column) learn from the teacher only.
benchmarks/README.md#distillation has what it reaches.
"""

import os

from jaxft.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(__file__), "sst2_minilm.py"))
  with c.unlocked():
    c.model.keep_layers = (0, 2, 4)
    c.train.distill.temperature = 2.0
    c.train.distill.alpha = 0.5
  return c
