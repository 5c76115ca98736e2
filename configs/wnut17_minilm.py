"""WNUT-17 emerging-entity NER on social media (6 types, BIO tags) with the default model.

  python -m jaxft.train --config=configs/wnut17_minilm.py --workdir=runs/wnut17 \
    --config.data.train_file=../shared/data/wnut17/wnut17train.conll \
    --config.data.validation_file=../shared/data/wnut17/emerging.dev.conll

The CoNLL-2003 recipe (configs/conll03_minilm.py) on files of `token<TAB>tag` lines; lines
holding only whitespace end sentences. A token that the tokenizer turns into nothing (the dev
file holds a zero-width space) is read as [UNK], so it keeps its tag.
"""

import os

from jaxft.config import load_config_file


def get_config():
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "conll03_minilm.py"))
