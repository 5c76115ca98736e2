"""First-match rules over parameter paths: the one mechanism behind every per-parameter choice.

A parameter's path is its keys joined by "/", e.g. "bert/encoder/layer/0/attention/self/query/
kernel" (LoRA factors: "lora/bert/.../query/lora_a"). A rule is a pair (regex, value); the value
of a path is that of the first rule whose regex matches the whole path (re.fullmatch). PEFT's
trainable masks (peft.trainable_rules), sharding (parallel.param_rules), weight-decay and
learning-rate multipliers (optimizer.weight_decay_rules, optimizer.lr_rules) are all read
this way, over the same paths.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Sequence

import jax

from jaxft.errors import fail

Rules = Sequence[tuple[str, Any]]
_NO_DEFAULT = object()


def path(keys: Sequence) -> str:
  """The path of a tree leaf from its keys: dict keys as they are, or JAX key-path entries
  (DictKey, GetAttrKey, SequenceKey)."""
  parts = []
  for key in keys:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return "/".join(parts)


def first_match(name: str, rules: Rules, default: Any = _NO_DEFAULT, key: str = "rules") -> Any:
  """The value of the first rule matching `name`; `default` when none does, else an error
  that names the config `key` the rules came from."""
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  if default is _NO_DEFAULT:
    fail(f"no {key} pattern matches the parameter {name}; end the rules with a catch-all "
         "('.*', value)")
  return default


def leaf_paths(tree: Any) -> list[str]:
  """The path of every leaf of `tree`, in JAX's leaf order."""
  return [path(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """A tree like `tree` with fn(path, leaf) at every leaf."""
  return jax.tree_util.tree_map_with_path(lambda keys, leaf: fn(path(keys), leaf), tree)


def values(tree: Any, rules: Rules, default: Any = _NO_DEFAULT, key: str = "rules") -> Any:
  """A tree like `tree` holding each leaf's rule value."""
  return map_paths(lambda name, _: first_match(name, rules, default, key), tree)


def nearby(pattern: str, names: Sequence[str], n: int = 4) -> list[str]:
  """Paths that look like what `pattern` was meant to match, for an error message."""
  words = re.sub(r"[^A-Za-z0-9_/]+", " ", pattern).split()
  probe = max(words, key=len) if words else pattern
  return difflib.get_close_matches(probe, names, n=n, cutoff=0.0) or list(names[:n])


def check_matches(pattern: str, names: Sequence[str], key: str) -> None:
  """A pattern that matches no parameter is a mistake (a typo, another model's names)."""
  if not any(re.fullmatch(pattern, name) for name in names):
    fail(f"config {key} pattern {pattern!r} matches no parameter; nearby names: "
         f"{nearby(pattern, names)}")
