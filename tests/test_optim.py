"""Weight-decay mask rules and the learning-rate schedule."""

import pytest

from jaxft import optim


def test_weight_decay_mask_skips_biases_and_layernorm():
  params = {"bert": {"encoder": {"layer": {"0": {
      "attention": {"self": {"query": {"kernel": 0, "bias": 0}}},
      "output": {"LayerNorm": {"scale": 0, "bias": 0}, "dense": {"kernel": 0}}}}},
      "embeddings": {"word_embeddings": {"embedding": 0}}},
      "classifier": {"kernel": 0, "bias": 0}}
  mask = optim.weight_decay_mask(params)
  layer = mask["bert"]["encoder"]["layer"]["0"]
  assert layer["attention"]["self"]["query"] == {"kernel": True, "bias": False}
  assert layer["output"]["LayerNorm"] == {"scale": False, "bias": False}
  assert layer["output"]["dense"]["kernel"] is True
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"] is True
  assert mask["classifier"] == {"kernel": True, "bias": False}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_warms_up_then_decays_to_zero(kind):
  s = optim.learning_rate_schedule(1e-3, total_steps=100, warmup_ratio=0.1, kind=kind)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(55)) == pytest.approx(5e-4, rel=1e-5)  # half way through the decay
  assert float(s(100)) == pytest.approx(0.0, abs=1e-12)
  values = [float(s(i)) for i in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_without_warmup():
  s = optim.learning_rate_schedule(2e-5, 50, 0.0, "constant")
  assert [float(s(i)) for i in (0, 10, 49)] == pytest.approx([2e-5] * 3)
