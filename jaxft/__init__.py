"""jaxft: fine-tune pretrained transformer encoders with JAX.

Where things live:
  config.py      every config key, its default and its checks
  data/          reading files, labels, tokenization, deterministic bucketed batches
  models.py      loading Hugging Face Flax models and tokenizers, heads, parameter counts
  optim.py       the optax chain: schedule, AdamW, weight-decay mask, clipping
  step.py        the pure train_step / eval_step
  parallel.py    device mesh, shardings, putting host batches on devices
  checkpoint.py  orbax checkpoints: save, best/latest, restore onto any mesh
  metrics.py     task metrics and metric writers (metrics.jsonl, TensorBoard)
  experiment.py  what train and evaluate share: model, data and state for one config
  train.py evaluate.py   thin absl entry points
  attention.py   BERT-family self-attention: a JAX path and a C++ kernel for the CPU
  native/        jaxft's C++ (the attention kernel, the scratch-buffer cache), built on use
  hugepages.py   why entry points restart themselves once (huge pages, scratch buffers kept)
"""

import sys as _sys

# Entry points only, before any heavy import. `python -m jaxft.hugepages` restarts itself in its
# own __main__ (imported here first, runpy would warn about running a module already loaded).
if "jaxft.hugepages" not in getattr(_sys, "orig_argv", ()):
  from jaxft import hugepages as _hugepages
  _hugepages.restart_entry_point_with_hugepages()

__version__ = "0.1.0"
