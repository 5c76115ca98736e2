"""Learning rate x batch size for a classification config (configs/sst2_minilm.py):

  jaxft-sweep --config=configs/sst2_minilm.py --sweep=configs/sweeps/sst2_lr_bs.py \
    --workdir=runs/sst2_sweep --trials=12 --workers=2 \
    --config.data.train_file=../shared/data/sst2/train.tsv \
    --config.data.validation_file=../shared/data/sst2/dev.tsv

TPE over a log-uniform learning rate and three batch sizes; every trial evaluates 4 times and
the median pruner stops a trial that is below the median of the others at the same evaluation
(never at its first). The config's own values run first, as the baseline.
"""

from jaxft.sweep.space import categorical, log_uniform, sweep_config


def get_config():
  s = sweep_config()
  s.params = (
      ("train.learning_rate", log_uniform(1e-5, 5e-4)),
      ("train.batch_size", categorical(8, 16, 32)),
  )
  s.sampler = "tpe"
  s.pruner = "median"
  s.startup_trials = 4
  s.warmup_evaluations = 1
  s.evaluations = 4
  s.lock()
  return s
