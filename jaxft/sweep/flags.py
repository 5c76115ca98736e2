"""The flags jaxft-sweep and its workers share (a worker gets the command line it was started
from), and loading what they name."""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from jaxft import runtime
from jaxft.errors import fail
from jaxft.sweep import space


def define() -> dict:
  """Defines the flags (at run time, so that modules import together); returns their holders."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "The config file every trial starts from (configs/*.py); override "
          "keys with --config.<key>=<value>.", lock_config=True),
      "sweep": config_flags.DEFINE_config_file(
          "sweep", None, "The sweep file (configs/sweeps/*.py): search space, sampler, pruner; "
          "override keys with --sweep.<key>=<value>.", lock_config=True),
      "workdir": flags.DEFINE_string(
          "workdir", None, "The sweep's directory: study.journal, trials/<n>/ (each an ordinary "
          "run), best_config.py. An existing one is resumed."),
      "trials": flags.DEFINE_integer(
          "trials", None, "Trials in the whole sweep, finished or pruned (a resumed sweep runs "
          "only the rest)."),
      "workers": flags.DEFINE_integer(
          "workers", 1, "Worker processes running trials side by side on this host; each gets "
          "its share of the CPU cores or GPUs."),
  }


def loaded(held: dict) -> tuple:
  """(config, sweep, directory, trials) from the flags, the sweep checked against the config."""
  config = runtime.loaded_config(held["config"])
  sweep = held["sweep"].value
  if sweep is None:
    fail("--sweep is required, e.g. --sweep=configs/sweeps/sst2_lr_bs.py")
  try:
    sweep.keys()
  except OSError as e:
    fail(f"cannot load the --sweep file: {e.strerror or e}; pass a configs/sweeps/*.py file")
  missing = [k for k in space.sweep_config().keys() if k not in sweep]
  if missing:
    fail(f"the --sweep file's config lacks {missing}; start it from jaxft.sweep.space."
         "sweep_config()")
  if held["trials"].value < 1:
    fail(f"--trials={held['trials'].value} must be at least 1")
  if held["workers"].value < 1:
    fail(f"--workers={held['workers'].value} must be at least 1")
  space.check_space(sweep, config)
  directory = held["workdir"].value
  if "://" in directory:
    fail(f"--workdir={directory}: a sweep's study is a journal file on a local or shared "
         "filesystem; use a path (its trials may still be run elsewhere)")
  return config, sweep, os.path.abspath(directory), held["trials"].value


def config_file(held: dict) -> str:
  return os.path.abspath(config_flags.get_config_filename(flags.FLAGS[held["config"].name]))


def config_overrides(held: dict) -> dict:
  """The --config.<key>=<value> overrides of the command line, {dotted key: value}."""
  return dict(config_flags.get_override_values(flags.FLAGS[held["config"].name]))
