"""jaxft.rules: one path spelling and one first-match function behind PEFT masks, sharding,
weight decay and learning-rate multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxft import optim, parallel, peft, rules
from jaxft.errors import UserError

PARAMS = {"bert": {"encoder": {"layer": {"0": {
    "attention": {"self": {"query": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)}}},
    "output": {"LayerNorm": {"scale": np.ones(8)}}}}}},
    "classifier": {"kernel": np.zeros((8, 2)), "bias": np.zeros(2)}}
QUERY = "bert/encoder/layer/0/attention/self/query/kernel"


def test_one_path_spelling_for_dict_keys_and_jax_key_paths():
  assert rules.path(("bert", "encoder", 0, "kernel")) == "bert/encoder/0/kernel"
  (keys, _), *_ = jax.tree_util.tree_flatten_with_path({"a": [np.zeros(1)]})[0]
  assert rules.path(keys) == "a/0"
  state = optax.adam(1e-3).init({"w": jnp.zeros(2)})
  assert rules.leaf_paths(state) == ["0/count", "0/mu/w", "0/nu/w"]
  assert QUERY in rules.leaf_paths(PARAMS)


def test_the_first_matching_rule_wins_over_the_whole_path():
  ordered = ((r".*query/kernel", "q"), (r".*kernel", "k"), (r".*", "rest"))
  assert rules.first_match(QUERY, ordered) == "q"
  assert rules.first_match("classifier/kernel", ordered) == "k"
  assert rules.first_match("classifier/bias", ordered) == "rest"
  assert rules.first_match("classifier/bias", ((r"bias", 1),), 0) == 0  # fullmatch, not search
  with pytest.raises(UserError, match="no parallel.param_rules pattern matches the parameter x/y"):
    rules.first_match("x/y", ((r"z", 1),), key="parallel.param_rules")
  values = rules.values(PARAMS, ((r"classifier/.*", True), (r".*", False)))
  assert values["classifier"]["bias"] is True and values["bert"]["encoder"]["layer"]["0"][
      "output"]["LayerNorm"]["scale"] is False


def test_a_pattern_matching_nothing_names_nearby_parameters():
  with pytest.raises(UserError, match="matches no parameter; nearby names: .*query/kernel"):
    rules.check_matches(r".*qeury/kernel", rules.leaf_paths(PARAMS), "peft.trainable_rules")


def test_peft_sharding_decay_and_lr_read_the_same_paths_the_same_way():
  rule = ((r".*attention/self/query/kernel", 1),)
  trainable, frozen = peft.split_params(PARAMS, ((rule[0][0], True), (r".*", False)), "freeze")
  assert rules.leaf_paths(trainable) == [QUERY]
  lr = optim.lr_multipliers(PARAMS, rules=((rule[0][0], 3.0),))
  assert lr["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"] == 3.0
  assert lr["classifier"]["kernel"] == 1.0
  decay = optim.weight_decay_rates(PARAMS, 0.1, ((r"classifier/.*", 0.5),))
  assert decay["classifier"]["kernel"] == pytest.approx(0.05)
  assert decay["classifier"]["bias"] == 0.0  # never on biases
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES)
  shardings = parallel.param_shardings(PARAMS, mesh, ((rule[0][0], ("fsdp", "tensor")),
                                                      (r".*", ())))
  query = shardings["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
  assert query["kernel"].spec == P(None, None)  # axes of size 1 stay whole
  assert parallel.spec_for(QUERY, (8, 8), ((r".*query/kernel", ("fsdp", "tensor")),),
                           _FakeMesh()) == P("fsdp", "tensor")


class _FakeMesh:
  shape = {"data": 1, "fsdp": 2, "tensor": 4}


def test_optimizer_moments_follow_their_parameters_sharding():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())
  params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(0)}
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES)
  shardings = parallel.state_shardings(state, mesh, ((r"w", ("fsdp", None)), (r".*", ())), tx)
  adam = shardings["opt_state"][1]
  assert adam.mu["w"] is shardings["params"]["w"] and adam.nu["b"] is shardings["params"]["b"]
  assert adam.count.spec == P() and shardings["rng"].spec == P()
