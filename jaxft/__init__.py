"""jaxft: fine-tune pretrained transformer encoders with JAX.

Where things live:
  config.py      every config key, its default and its checks; the resolved config
  rules.py       first-match regex rules over parameter paths (PEFT, sharding, decay, lr)
  data/          reading files, labels, tokenization; deterministic batches, bucketed or
                 packed (several examples per row: packing.py, order.py)
  tasks.py       what differs per task: loss, eval outputs
  models.py      loading Hugging Face Flax models and tokenizers, heads, parameter counts
  attention.py   BERT-family self-attention, packed rows included (the JAX path; the CPU
                 kernel is in cpu/)
  peft.py        the trainable/frozen split of the parameters; the PEFT methods
  optim.py       the optax chain: schedule, AdamW, weight-decay mask, clipping; its run
                 values (learning rate, length, ...) live in its state, not in programs
  step.py        the pure train_step / eval_step
  compiled.py    the compiled steps: jit/pmap, shardings, per-width programs, program cache
  parallel.py    device mesh, shardings, putting host batches on devices, multi-host
  checkpoint.py  orbax checkpoints: save, best/latest, restore onto any mesh
  storage.py     the run's files, local or gs:// alike
  inference.py   restoring for evaluation, loading exports, the predictor
  metrics.py     task metrics and metric writers (metrics.jsonl, TensorBoard)
  experiment.py  what train and inference share: model, data and state for one config
  runtime.py     process start-up, private caches, JAX settings, flag parsing
  train.py evaluate.py predict.py export.py report.py   thin absl entry points
  sweep/         jaxft-sweep: Optuna hyperparameter search, trials as ordinary runs
  cpu/           CPU-only tuning (huge pages, scratch-buffer cache, C++ attention kernel),
                 used on CPU hosts only; JAXFT_CPU_TUNING=0 turns it off

Importing jaxft has no side effects.
"""

__version__ = "0.1.0"
