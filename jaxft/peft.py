"""Parameter-efficient fine-tuning as parameter-subtree masking.

Every method is one mechanism: first-match (regex, trainable) rules over parameter paths
(jaxft.rules) split the model's parameters into a trainable tree (differentiated, with optimizer
state, checkpointed) and a frozen tree (a constant argument of the step, loaded from the base
model).

  none     everything trainable
  bitfit   biases (and the task head) only
  freeze   what `peft.trainable_rules` marks, e.g. the top layers; by default the head only
  lora     the base model frozen; low-rank factors A [in, r] and B [r, out] trainable for every
           kernel matched by `peft.lora.targets`, plus the head. B starts at zero, so the model
           starts exactly at the pretrained function.

LoRA is applied functionally at apply time, without rewriting the Hugging Face modules: a flax
method interceptor adds scale * dropout(x) @ A @ B to the output of each targeted Dense layer.
The LoRA factors live in the trainable tree under the key "lora", nested by module path.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft import rules as rules_lib
from jaxft.config import LORA_ALL_LINEAR
from jaxft.errors import fail

LORA_KEY = "lora"


def trainable_rules(peft_config) -> tuple:
  """The (regex, trainable) rules of the configured method; user rules come first."""
  head = ((peft_config.head_pattern, True),) if peft_config.train_head else ()
  user = tuple(tuple(r) for r in peft_config.trainable_rules)
  method = peft_config.method
  if method == "none":
    return user + ((r".*", True),)
  if method == "bitfit":
    return user + head + ((r".*/bias", True), (r".*", False))
  return user + head + ((r".*", False),)  # freeze and lora: only what the rules name


def split_params(params: dict, rules: Sequence, method: str) -> tuple[dict, dict]:
  """(trainable, frozen) trees by first-match rules; an error when nothing would train."""
  flat = traverse_util.flatten_dict(params)
  paths = [rules_lib.path(k) for k in flat]
  for pattern, value in rules:
    if pattern != r".*" and value:
      rules_lib.check_matches(pattern, paths, "peft.trainable_rules")
  trainable, frozen = {}, {}
  for (key, value), path in zip(flat.items(), paths):
    is_trainable = rules_lib.first_match(path, rules, False)
    (trainable if is_trainable else frozen)[key] = value
  if not trainable and method != "lora":
    fail(f"peft.method={method} with these rules leaves no parameter trainable; add a "
         "(pattern, True) rule to peft.trainable_rules, e.g. for the top layer "
         f"'.*layer/5/.*'; parameter names look like {paths[:3]}")
  return (traverse_util.unflatten_dict(trainable) if trainable else {},
          traverse_util.unflatten_dict(frozen) if frozen else {})


# ---- LoRA ------------------------------------------------------------------------------------
def lora_target_pattern(targets: str, head_pattern: str) -> str:
  if targets == LORA_ALL_LINEAR:
    return r"(?!" + head_pattern + r").*/kernel"
  return targets


def lora_scale(lora_config) -> float:
  if lora_config.use_rslora:
    return float(lora_config.alpha) / math.sqrt(lora_config.rank)
  return float(lora_config.alpha) / lora_config.rank


def init_lora(params: dict, lora_config, head_pattern: str, seed: int) -> dict:
  """A [in, r] ~ Kaiming-uniform (as PEFT), B [r, out] = 0 for each targeted 2-D kernel."""
  flat = traverse_util.flatten_dict(params)
  paths = [rules_lib.path(k) for k in flat]
  pattern = lora_target_pattern(lora_config.targets, head_pattern)
  if lora_config.targets != LORA_ALL_LINEAR:
    rules_lib.check_matches(pattern, paths, "peft.lora.targets")
  targeted = ((pattern, True),)
  rng = np.random.default_rng(seed + 1)
  factors = {}
  for (key, value), path in zip(flat.items(), paths):
    if len(value.shape) != 2 or not rules_lib.first_match(path, targeted, False):
      continue
    fan_in, fan_out = value.shape
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) as torch.nn.Linear and PEFT
    module = key[:-1]
    factors[module + ("lora_a",)] = rng.uniform(-bound, bound, (fan_in, lora_config.rank)
                                                ).astype(np.float32)
    factors[module + ("lora_b",)] = np.zeros((lora_config.rank, fan_out), np.float32)
  if not factors:
    fail(f"peft.lora.targets {lora_config.targets!r} matches no 2-D kernel; nearby names: "
         f"{rules_lib.nearby(pattern, paths)}")
  return traverse_util.unflatten_dict(factors)


def _lookup(tree: dict, path: tuple) -> Optional[dict]:
  for part in path:
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree if isinstance(tree, dict) and "lora_a" in tree else None


def lora_interceptor(lora: dict, scale: float, rate: float, rng: Optional[jax.Array],
                     train: bool):
  """Adds scale * dropout(x) @ A @ B to every Dense layer that has LoRA factors."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
      return out
    factors = _lookup(lora, tuple(context.module.path))
    if factors is None:
      return out
    x = args[0]
    if train and rate > 0.0:
      key = jax.random.fold_in(rng, zlib.crc32("/".join(context.module.path).encode()))
      keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
      x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    delta = (x @ factors["lora_a"].astype(x.dtype)) @ factors["lora_b"].astype(x.dtype)
    return out + (scale * delta).astype(out.dtype)

  return interceptor


def with_lora(logits_fn: Callable, scale: float, rate: float) -> Callable:
  """Wraps a (params, batch, rng, train) -> logits function to apply params["lora"]."""

  def logits(params, batch, rng, train):
    lora = params.get(LORA_KEY)
    if not lora:
      return logits_fn(params, batch, rng, train)
    rest = {k: v for k, v in params.items() if k != LORA_KEY}
    lora_rng = None
    if train and rate > 0.0:
      rng, lora_rng = jax.random.split(rng)
    with nn.intercept_methods(lora_interceptor(lora, scale, rate, lora_rng, train)):
      return logits_fn(rest, batch, rng, train)

  return logits


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
  """Full parameters with W + scale * A @ B folded into each targeted kernel (for export)."""
  flat = traverse_util.flatten_dict(params)
  for key in list(flat):
    if key[-1] != "kernel":
      continue
    factors = _lookup(lora, key[:-1])
    if factors is not None:
      flat[key] = np.asarray(flat[key]) + scale * (np.asarray(factors["lora_a"]) @
                                                   np.asarray(factors["lora_b"]))
  return traverse_util.unflatten_dict(flat)
