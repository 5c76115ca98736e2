"""What a sweep file says: the search space over config keys, the sampler, the pruner.

A sweep file (configs/sweeps/*.py) returns `sweep_config()` filled in:

  s.params = (("train.learning_rate", log_uniform(1e-5, 5e-4)),
              ("train.batch_size", categorical(16, 32)))

Distributions are plain tuples, so a sweep file is data and imports nothing heavy. Every value a
distribution can give is checked against the run's config before any trial starts
(`check_space`): a misspelt key or an impossible value is a one-line error, not a failed trial.
This module imports neither JAX nor Optuna.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import ml_collections

from jaxft import config as config_lib
from jaxft.errors import fail

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "successive_halving", "none")
PRUNED_CHECKPOINTS = ("remove", "keep")
COMPLETED_CHECKPOINTS = ("best", "all")
KINDS = ("log_uniform", "uniform", "int", "log_int", "categorical")


# ---- distributions -----------------------------------------------------------------------------
def log_uniform(low: float, high: float) -> tuple:
  """A float between `low` and `high`, uniform in its logarithm (learning rates)."""
  return ("log_uniform", float(low), float(high))


def uniform(low: float, high: float) -> tuple:
  return ("uniform", float(low), float(high))


def integer(low: int, high: int, log: bool = False) -> tuple:
  """An integer in [low, high] (epochs, ranks); `log`: uniform in its logarithm."""
  return ("log_int" if log else "int", int(low), int(high))


def categorical(*choices) -> tuple:
  """One of `choices` (batch sizes, schedules, PEFT methods)."""
  return ("categorical", tuple(choices))


def sweep_config() -> ml_collections.ConfigDict:
  """Defaults for every sweep key; a sweep file sets `params` and what else it needs."""
  s = ml_collections.ConfigDict()
  s.params = ()  # ((config key, distribution), ...)
  # (config key, value) pairs every trial sets, e.g. (("train.num_evaluations", 4),).
  s.fixed = ()
  s.sampler = "tpe"  # tpe (Optuna's default) | random | grid (categorical params only)
  s.pruner = "median"  # median | successive_halving | none
  # Trials that finish before TPE models the results and the median pruner compares.
  s.startup_trials = 4
  # Evaluations every trial runs before it may be pruned.
  s.warmup_evaluations = 1
  s.reduction_factor = 3  # successive_halving: a third of the trials go on at each rung
  # How many times each trial evaluates, spread over its training: the steps at which trials
  # are compared (train.num_evaluations). 0 keeps the config's own evaluation schedule.
  s.evaluations = 4
  s.seed = 0
  # The config's own values, where they lie in the space, as the first trial: the baseline the
  # sweep has to beat, measured alongside it (tpe and random; a grid runs every point).
  s.baseline_first = True
  s.pruned_checkpoints = "remove"  # a pruned trial's checkpoints: remove | keep
  s.completed_checkpoints = "best"  # a finished trial's checkpoints: best (only) | all
  return s


# ---- checks ------------------------------------------------------------------------------------
def _values_to_check(distribution: tuple) -> list:
  kind = distribution[0]
  return list(distribution[1]) if kind == "categorical" else [distribution[1], distribution[2]]


def _check_distribution(key: str, distribution: Any) -> None:
  where = f"sweep params {key}"
  if not isinstance(distribution, tuple) or not distribution or distribution[0] not in KINDS:
    fail(f"{where}: {distribution!r} is not a distribution; use log_uniform(low, high), "
         "uniform(low, high), integer(low, high) or categorical(a, b, ...) from "
         "jaxft.sweep.space")
  kind = distribution[0]
  if kind == "categorical":
    if len(distribution) != 2 or not distribution[1]:
      fail(f"{where}: categorical() needs at least one choice")
    return
  if len(distribution) != 3:
    fail(f"{where}: {kind} takes (low, high), got {distribution[1:]!r}")
  low, high = distribution[1:]
  if not low < high:
    fail(f"{where}: low={low} must be below high={high}")
  if kind.startswith("log") and low <= 0:
    fail(f"{where}: a log scale needs low > 0, got {low}")


def check_space(sweep, config) -> None:
  """One-line errors for a sweep that cannot run with `config`: unknown keys, impossible
  values, a sampler or pruner jaxft does not know, a grid over continuous ranges."""
  for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS),
                       ("pruned_checkpoints", PRUNED_CHECKPOINTS),
                       ("completed_checkpoints", COMPLETED_CHECKPOINTS)):
    if sweep[key] not in allowed:
      fail(f"sweep {key}={sweep[key]!r} is not supported; use one of {list(allowed)}")
  for key in ("startup_trials", "warmup_evaluations", "evaluations"):
    if sweep[key] < 0:
      fail(f"sweep {key}={sweep[key]} must be >= 0")
  if sweep.reduction_factor < 2:
    fail(f"sweep reduction_factor={sweep.reduction_factor} must be at least 2")
  if not sweep.params:
    fail("the sweep file sets no params; add e.g. "
         "s.params = ((\"train.learning_rate\", log_uniform(1e-5, 5e-4)),)")
  keys = [pair[0] if isinstance(pair, tuple) and len(pair) == 2 else None
          for pair in sweep.params]
  if None in keys:
    fail(f"sweep params entry {sweep.params[keys.index(None)]!r} must be a "
         "(config key, distribution) pair")
  if len(set(keys)) != len(keys):
    fail(f"sweep params name {[k for k in keys if keys.count(k) > 1][0]} twice")
  for pair in sweep.fixed:
    if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
      fail(f"sweep fixed entry {pair!r} must be a (config key, value) pair")
    if pair[0] in keys:
      fail(f"sweep fixed sets {pair[0]}, which params searches; keep it in one of them")
  base = trial_config(config, sweep, {})
  for key, distribution in sweep.params:
    _check_distribution(key, distribution)
    if sweep.sampler == "grid" and distribution[0] != "categorical":
      fail(f"sweep sampler=grid needs categorical params; {key} is {distribution[0]}: list its "
           "values with categorical(...)")
    for value in _values_to_check(distribution):
      _check_value(base, key, value)


def _is_config_key(config, dotted: str) -> bool:
  *sections, name = dotted.split(".")
  for section in sections:
    if section not in config or not isinstance(config[section], ml_collections.ConfigDict):
      return False
    config = config[section]
  return name in config and not isinstance(config[name], ml_collections.ConfigDict)


def _check_value(config, key: str, value) -> None:
  if not _is_config_key(config, key):
    fail(f"sweep params key {key} is not a config key; see jaxft/config.py for the keys")
  try:
    candidate = config_lib.replace(config, {key: value})
  except TypeError as e:
    fail(f"sweep params {key}={value!r} does not fit the config key ({e})")
  config_lib.validate(candidate)


# ---- a trial's config ------------------------------------------------------------------------
def trial_settings(sweep, values: dict) -> dict:
  """{config key: value} a trial sets on top of the config: the sweep's evaluation schedule and
  fixed keys, then the trial's `values`."""
  settings = {}
  if sweep.evaluations:
    settings.update({"train.num_evaluations": sweep.evaluations, "train.eval_every": 0})
  settings.update(dict(sweep.fixed))
  settings.update(values)
  return settings


def trial_config(config, sweep, values: dict) -> ml_collections.ConfigDict:
  """The config a trial with `values` ({config key: value}) runs."""
  settings = trial_settings(sweep, values)
  for key in settings:
    if not _is_config_key(config, key):
      fail(f"sweep sets {key}, which is not a config key; see jaxft/config.py for the keys")
  return config_lib.replace(config, settings)


def lookup(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def baseline_values(config, sweep) -> dict:
  """The config's own values of the searched keys, or {} when one lies outside the space."""
  values = {}
  for key, distribution in sweep.params:
    value = lookup(config, key)
    kind = distribution[0]
    if kind == "categorical":
      inside = value in distribution[1]
    else:
      inside = value is not None and distribution[1] <= value <= distribution[2]
    if not inside:
      return {}
    values[key] = value
  return values


def grid(sweep) -> dict[str, list]:
  """{key: choices} of a grid sweep (check_space made sure every param is categorical)."""
  return {key: list(distribution[1]) for key, distribution in sweep.params}


def grid_size(sweep) -> int:
  return math.prod(len(choices) for choices in grid(sweep).values())


def suggest(trial, params: Sequence) -> dict:
  """{config key: value} drawn for an Optuna trial (ask-and-tell) from the sweep's params."""
  values = {}
  for key, distribution in params:
    kind, *args = distribution
    if kind == "categorical":
      values[key] = trial.suggest_categorical(key, list(args[0]))
    elif kind in ("int", "log_int"):
      values[key] = trial.suggest_int(key, args[0], args[1], log=kind == "log_int")
    else:
      values[key] = trial.suggest_float(key, args[0], args[1], log=kind == "log_uniform")
  return values


def describe(params: Sequence) -> list:
  """The search space as JSON-friendly data (recorded in the sweep's directory)."""
  return [[key, list(distribution[:1]) + [list(a) if isinstance(a, tuple) else a
                                           for a in distribution[1:]]]
          for key, distribution in params]
