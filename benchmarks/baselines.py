r"""The baselines benchmarks/bench.py measures jaxft against, written the way users write them.

- `plain_flax_step`: the Hugging Face Flax model applied under `jax.jit` with optax AdamW, as
  the old `run_flax_glue.py` did (dropout from threefry keys, a weight-decay mask, no extras).
- `torch_eager_step`: PyTorch `BertForSequenceClassification`, eager, `torch.optim.AdamW`.
- `python benchmarks/baselines.py --train_file=... --validation_file=...`: the Hugging Face PyTorch
  `Trainer` fine-tuning run (DataCollatorWithPadding, or `--padding=max_length`), printing its
  dev accuracy as JSON on the last line. Torch is needed only here; jaxft never imports it.
"""

from __future__ import annotations

import csv
import json
import sys
import time

import numpy as np


def synthetic_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """Full-length random token ids ([CLS] ... [SEP]): every batch has exactly the shape asked."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 20000, (batch, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  return ids


def plain_flax_step(model_dir: str, batch: int, length: int, learning_rate: float = 1e-4):
  """() -> runs one train step of the plain-jit reference (blocks until it is done)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import traverse_util
  from transformers import FlaxAutoModelForSequenceClassification
  model = FlaxAutoModelForSequenceClassification.from_pretrained(model_dir, from_pt=True,
                                                                  num_labels=2)

  def decay_mask(params):  # run_flax_glue.py: no decay on biases and LayerNorm scales
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: k[-1] != "bias" and k[-2:] != ("LayerNorm", "scale") for k in flat})

  tx = optax.adamw(learning_rate, weight_decay=0.01, mask=decay_mask)
  ids = jnp.asarray(synthetic_ids(batch, length))
  labels = jnp.asarray(np.arange(batch) % 2)

  @jax.jit
  def train_step(params, opt_state, rng):
    dropout_rng, new_rng = jax.random.split(rng)

    def loss_fn(p):
      logits = model(ids, jnp.ones_like(ids), jnp.zeros_like(ids), params=p,
                     dropout_rng=dropout_rng, train=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_rng, loss

  state = [model.params, tx.init(model.params), jax.random.PRNGKey(0)]

  def step():
    params, opt_state, rng, loss = train_step(*state)
    state[:] = [params, opt_state, rng]
    jax.block_until_ready(loss)

  return step


def torch_eager_step(model_dir: str, batch: int, length: int, learning_rate: float = 1e-4,
                     autocast: bool = False, device: str = "cpu"):
  """() -> runs one eager PyTorch train step (synchronised), or None without torch."""
  try:
    import torch
    from transformers import AutoModelForSequenceClassification
  except ImportError:
    return None
  torch.manual_seed(0)
  model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
  ids = torch.as_tensor(synthetic_ids(batch, length), dtype=torch.long, device=device)
  labels = torch.as_tensor(np.arange(batch) % 2, dtype=torch.long, device=device)
  mask = torch.ones_like(ids)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()

  return step


def _read_tsv(path: str, limit: int | None) -> tuple[list[str], list[int]]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  rows = rows[:limit] if limit else rows
  return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def trainer_run(model_dir: str, train_file: str, validation_file: str, examples: int,
                batch: int, learning_rate: float, padding: str, max_length: int = 128,
                seed: int = 0) -> dict:
  """The Hugging Face Trainer on an SST-2 style TSV: one epoch, then dev accuracy."""
  import tempfile
  import torch
  from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                            DataCollatorWithPadding, Trainer, TrainingArguments)
  torch.manual_seed(seed)
  tokenizer = AutoTokenizer.from_pretrained(model_dir)

  def encode(path, limit):
    texts, labels = _read_tsv(path, limit)
    enc = tokenizer(texts, truncation=True, max_length=max_length,
                    padding="max_length" if padding == "max_length" else False)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]}
            for i in range(len(texts))]

  train, dev = encode(train_file, examples), encode(validation_file, None)
  model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
  with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=64,
        learning_rate=learning_rate, num_train_epochs=1, warmup_ratio=0.1, weight_decay=0.01,
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=seed, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {
                          "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
  return {"accuracy": metrics["eval_accuracy"], "train_seconds": train_seconds}


def main(argv: list[str]) -> None:
  import argparse
  parser = argparse.ArgumentParser(description="The Hugging Face Trainer baseline (needs torch).")
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--train_file", required=True)
  parser.add_argument("--validation_file", required=True)
  parser.add_argument("--examples", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--learning_rate", type=float, default=1e-4)
  parser.add_argument("--padding", choices=("dynamic", "max_length"), default="dynamic")
  parser.add_argument("--seed", type=int, default=0)
  a = parser.parse_args(argv)
  result = trainer_run(a.model_dir, a.train_file, a.validation_file, a.examples, a.batch,
                       a.learning_rate, a.padding, seed=a.seed)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
