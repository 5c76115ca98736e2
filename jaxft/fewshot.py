"""Few-shot and zero-shot classification with a sentence embedder (model.pooling=mean).

- `sample_per_class`: data.examples_per_class=K draws K training examples of each class.
- train.method=contrastive is SetFit's method (Tunstall et al., 2022): the encoder is trained
  on sentence pairs of the few examples (same class: cosine similarity 1, else 0;
  `contrastive_pairs` builds them as the setfit library does), then a logistic-regression head
  is fitted on the frozen embeddings (`fit_head`) and becomes the model's dense head, so
  evaluate, predict and export treat it like any head. It runs in jaxft's own train loop
  (jaxft.train) with `PairSteps` as the batches and `cosine_similarity_loss` as the loss: every
  parallel mode, checkpoint and exact resume works as for any run.
- data.label_descriptions: each label's description, embedded; the head starts as the
  normalised description embeddings (`description_head`), so argmax over the logits is the
  most similar description. train.method=zero_shot stops there: no training step. A
  contrastive run adds the description head to its fitted one, as a prior.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import step as step_lib
from jaxft.data import batching, packing
from jaxft.data.encode import Encoded
from jaxft.errors import fail

# The description head's logits are cosine similarities times this (the scale
# sentence-transformers' ranking losses use): argmax is unchanged, probabilities are not flat.
DESCRIPTION_LOGIT_SCALE = 20.0


# Every pair of this many examples is 8.4M pairs (setfit enumerates them all, as here).
MAX_CONTRASTIVE_EXAMPLES = 4096


# ---- few-shot sampling -------------------------------------------------------------------------
def sample_per_class(labels: np.ndarray, k: int, seed: int, label_names: Sequence[str],
                     path: str) -> np.ndarray:
  """Indices of `k` examples of every class, ascending (file order): a pure function of
  (labels, k, seed)."""
  rng = np.random.default_rng([seed, k])
  chosen = []
  for class_id, name in enumerate(label_names):
    members = np.flatnonzero(labels == class_id)
    if len(members) < k:
      fail(f"data.examples_per_class={k}, but label {name!r} has {len(members)} example(s) in "
           f"{path}; lower data.examples_per_class to at most {len(members)}")
    chosen.append(rng.choice(members, k, replace=False))
  return np.sort(np.concatenate(chosen))


# ---- contrastive pairs -------------------------------------------------------------------------
def contrastive_pairs(labels: np.ndarray, seed: int,
                      num_iterations: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  """SetFit's sentence pairs: ([P, 2] example indices, [P] target similarities 1.0 / 0.0).

  Every unordered pair (an example with itself included) in a shuffled order is positive
  (same label) or negative; then positives and negatives alternate, each list repeated
  cyclically to `num_iterations` x examples pairs, or (None) to the longer list's length (the
  library's default "oversampling")."""
  n = len(labels)
  if n > MAX_CONTRASTIVE_EXAMPLES:
    fail(f"train.method=contrastive pairs every two of the {n} training examples; it is made "
         f"for few examples: set data.examples_per_class (or data.max_train_examples) so that "
         f"at most {MAX_CONTRASTIVE_EXAMPLES} remain")
  first, second = np.triu_indices(n)
  order = np.random.default_rng([seed, n]).permutation(len(first))
  first, second = first[order], second[order]
  same = labels[first] == labels[second]
  positives = np.stack([first[same], second[same]], -1)
  negatives = np.stack([first[~same], second[~same]], -1)
  if len(positives) == 0 or len(negatives) == 0:
    fail("contrastive training needs examples of at least two labels, and two examples of "
         "one label; give more labelled examples")
  count = num_iterations * n if num_iterations else max(len(positives), len(negatives))
  pos = positives[np.arange(count) % len(positives)]
  neg = negatives[np.arange(count) % len(negatives)]
  pairs = np.stack([pos, neg], 1).reshape(-1, 2)
  targets = np.tile(np.array([1.0, 0.0], np.float32), count)
  return pairs, targets


class PairSteps:
  """The steps of a contrastive run (the interface of jaxft.data.order.TrainOrder): each
  epoch takes every pair once, in an order that is a pure function of (seed, epoch).

  Pair i's two sentences are example slots 2i and 2i + 1 of its batch (so that devices and
  micro-batches, which split batches evenly, hold whole pairs). Packed (data.packing other
  than "off"), pairs fill rows (jaxft.data.packing: each sentence a segment attending to
  itself), the rows of a step are `groups` blocks of whole pairs, and one shape, fitted to
  the run's steps, serves them all."""

  def __init__(self, data: Encoded, train_config, seed: int, packed: bool, groups: int):
    """`train_config`: the run's config.train (batch size, pairs, length of the run)."""
    t = train_config
    self.pairs, self.targets = contrastive_pairs(np.asarray(data.labels), seed,
                                                 t.contrastive.num_iterations)
    self.batch_size, self.seed, self.groups = t.batch_size, seed, groups
    self.lengths = data.lengths
    self.pair_lengths = self.lengths[self.pairs[:, 0]] + self.lengths[self.pairs[:, 1]]
    epochs = (-(-t.num_train_steps // self.steps_per_epoch) if t.num_train_steps
              else int(np.ceil(t.num_epochs)))
    self.shape = self._fitted_shape(epochs) if packed else None

  @property
  def steps_per_epoch(self) -> int:
    return batching.steps_per_epoch(len(self.pairs), self.batch_size)

  def steps_in_epoch(self, epoch: int) -> int:
    return self.steps_per_epoch

  def num_steps(self, num_epochs: float) -> int:
    return max(1, int(np.ceil(num_epochs * self.steps_per_epoch)))

  def locate(self, step: int) -> tuple[int, int]:
    return divmod(step, self.steps_per_epoch)

  @functools.lru_cache(maxsize=2)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

  def step(self, step: int) -> np.ndarray:
    """Indices into `pairs` of step `step`'s pairs."""
    epoch, index = self.locate(step)
    return self._epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

  def _placement(self, chosen: np.ndarray, length: int) -> tuple[list, np.ndarray]:
    """(per group, rows of example indices; the pairs in slot order). A group's pairs are
    placed first-fit in decreasing length, each pair whole in one row; slots follow the
    rows, so a step's pairs change order (their loss is a sum: the order does not matter)."""
    placement, order = [], []
    for part in packing.split_groups(chosen, self.groups):
      rows, free = [], []
      for p in part[np.argsort(-self.pair_lengths[part], kind="stable")]:
        n = int(self.pair_lengths[p])
        at = next((r for r, room in enumerate(free) if room >= n), None)
        if at is None:
          rows.append([])
          free.append(length)
          at = len(rows) - 1
        rows[at].append(int(p))
        free[at] -= n
      placement.append([[int(x) for p in row for x in self.pairs[p]] for row in rows])
      order.extend(p for row in rows for p in row)
    return placement, np.asarray(order, np.int64)

  def _fitted_shape(self, epochs: int) -> packing.Shape:
    """Rows half as long again as the longest pair (so that short pairs fill them well), as
    many as the run's fullest step needs."""
    length = packing.round_up(int(self.pair_lengths.max()) * 3 // 2, 8)
    rows = max(len(group) for s in range(epochs * self.steps_per_epoch)
               for group in self._placement(self.step(s), length)[0])
    slots = packing.round_up(2 * self.batch_size, 2 * self.groups)
    return packing.Shape(rows * self.groups, length, slots, self.groups)

  def host_batch(self, exp, data: Encoded, step: int) -> dict:
    """This process's share of step `step`'s batch, each sentence labelled with its pair's
    target similarity; slots past the pairs weigh 0."""
    chosen = self.step(step)
    if self.shape is None:
      batch = batching.make_batch(data, self.pairs[chosen].reshape(-1), 2 * self.batch_size,
                                  exp.buckets)
    else:
      placement, chosen = self._placement(chosen, self.shape.length)
      batch = packing.make_packed_batch(data, placement, self.shape)
    labels = np.zeros(batch["weights"].shape, np.float32)
    labels[batch["index"] >= 0] = np.repeat(self.targets[chosen], 2)
    batch["labels"] = labels
    return batching.host_rows(batch, jax.process_index(), jax.process_count())

  def first_batches(self, exp, data: Encoded) -> list[dict]:
    """A batch of every shape a step can take (what to compile before step 1)."""
    if self.shape is not None:
      return [self.host_batch(exp, data, 0)]
    rows = 2 * self.batch_size
    widths = []
    for i in batching.first_of_each_width(data.lengths, exp.buckets):
      batch = batching.make_batch(data, np.array([i, i]), rows, exp.buckets)
      batch["labels"] = np.zeros((rows,), np.float32)
      widths.append(batching.host_rows(batch, jax.process_index(), jax.process_count()))
    return widths


class _NoSteps:
  """train.method=zero_shot's steps: none (the run evaluates and saves its step 0)."""
  steps_per_epoch = 1

  def steps_in_epoch(self, epoch: int) -> int:
    return 1

  def locate(self, step: int) -> tuple[int, int]:
    return 0, step


NO_STEPS = _NoSteps()


def cosine_similarity_loss(embeddings: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(summed, count) squared difference between each pair's cosine similarity and its target
  (sentence-transformers' CosineSimilarityLoss); rows 2i and 2i + 1 are pair i."""
  a, b = embeddings[0::2], embeddings[1::2]
  norms = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
  cosine = jnp.sum(a * b, -1) / norms
  weights = batch["weights"][0::2]
  return jnp.sum(weights * jnp.square(cosine - batch["labels"][0::2])), jnp.sum(weights)


# ---- embeddings and heads ----------------------------------------------------------------------
class Embedder:
  """[N, width] mean-pooled embeddings of examples under given trainable parameters (combined
  with the experiment's frozen ones), in data order, dropout off; one jitted program per
  bucket width."""

  def __init__(self, exp):
    self.exp = exp
    self._program = jax.jit(lambda params, frozen, batch: exp.embeddings(
        step_lib.combine(params, frozen), batch, None, False))

  def __call__(self, params: dict, data: Encoded) -> np.ndarray:
    exp, size = self.exp, self.exp.config.train.eval_batch_size
    out = np.zeros((len(data), exp.model.hf_config.hidden_size), np.float32)
    for indices in batching.eval_batches(data.lengths, size):
      host = exp.host_batch(data, indices, size)
      inputs = exp.to_mesh({k: host[k] for k in step_lib.MODEL_INPUTS if k in host})
      out[indices] = _gathered(self._program(params, exp.frozen(), inputs))[:len(indices)]
    return out


def _gathered(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def fit_head(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
             inverse_l2: float) -> dict:
  """The dense head {"kernel": [width, classes], "bias": [classes]} of a logistic regression
  fitted to `embeddings` (scikit-learn's, as the setfit library fits it). Two classes give one
  weight vector w: logits [0, w.x + b] have the same softmax."""
  from sklearn.linear_model import LogisticRegression
  model = LogisticRegression(C=inverse_l2, max_iter=1000)
  model.fit(embeddings, labels)
  width = embeddings.shape[1]
  kernel = np.zeros((width, num_classes), np.float32)
  bias = np.zeros((num_classes,), np.float32)
  classes = model.classes_.astype(int)
  if len(classes) == 2 and model.coef_.shape[0] == 1:
    kernel[:, classes[1]] = model.coef_[0]
    bias[classes[1]] = model.intercept_[0]
  else:
    kernel[:, classes] = model.coef_.T
    bias[classes] = model.intercept_
  return {"kernel": kernel, "bias": bias}


def descriptions_by_label(descriptions: Mapping[str, str],
                          label_names: Sequence[str]) -> list[str]:
  """Each label's description, in label order; a key is a label name or its index."""
  known = {str(k): str(v) for k, v in dict(descriptions).items()}
  names = {*label_names, *(str(i) for i in range(len(label_names)))}
  unknown = sorted(set(known) - names)
  if unknown:
    fail(f"data.label_descriptions names {unknown}, which are not labels of this task "
         f"({list(label_names)}); key each description by a label name or its index")
  out = []
  for i, name in enumerate(label_names):
    text = known.get(name, known.get(str(i)))
    if not text:
      fail(f"data.label_descriptions has no description for label {name!r}; add one, e.g. "
           f"--config.data.label_descriptions='{{\"{name}\": \"a ... text\"}}'")
    out.append(text)
  return out


def description_head(embeddings: np.ndarray) -> dict:
  """The dense head whose logits are DESCRIPTION_LOGIT_SCALE x each label description's
  normalised embedding . the pooled input divided by the descriptions' mean norm: the
  argmax is the most cosine-similar description, whatever the input's norm."""
  norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
  kernel = (embeddings / norms).T * (DESCRIPTION_LOGIT_SCALE / float(norms.mean()))
  return {"kernel": kernel.astype(np.float32),
          "bias": np.zeros((embeddings.shape[0],), np.float32)}


def replace_head(params: dict, head: Mapping[str, np.ndarray]) -> dict:
  """`params` (trainable, on the devices) with the dense head replaced by `head`, each array
  laid out as the one it replaces."""
  old = params["classifier"]
  new = {k: jax.make_array_from_callback(old[k].shape, old[k].sharding,
                                         lambda index, v=np.asarray(head[k]): v[index])
         for k in old}
  return {**params, "classifier": new}


class HeadFitter:
  """The contrastive run's head at a step: a logistic regression on the embeddings of the
  training examples under that step's encoder (cached for the step), plus, where
  data.label_descriptions are given, the description head under the same encoder (a
  zero-shot prior: on SST-2 with 8 examples per label it adds 7 points, benchmarks/README.md)."""

  def __init__(self, exp, data: Encoded):
    self.exp, self.data, self.embed = exp, data, Embedder(exp)
    descriptions = exp.config.data.label_descriptions
    self.descriptions = None if descriptions is None else exp.encode_texts(
        descriptions_by_label(descriptions, exp.label_names))
    self._step, self._head = None, None

  def head(self, params: dict, step: int) -> dict:
    if self._step != step:
      head = fit_head(self.embed(params, self.data), np.asarray(self.data.labels),
                      len(self.exp.label_names),
                      self.exp.config.train.contrastive.head_inverse_l2)
      if self.descriptions is not None:
        prior = description_head(self.embed(params, self.descriptions))
        head = {k: head[k] + prior[k] for k in head}
      self._step, self._head = step, head
    return self._head

  def params(self, params: dict, step: int) -> dict:
    return replace_head(params, self.head(params, step))

  def state(self, state: dict, step: int) -> dict:
    return {**state, "params": self.params(state["params"], step)}


def with_description_head(exp, params: dict) -> dict:
  """`params` (trainable, on the devices) with the head from data.label_descriptions."""
  texts = descriptions_by_label(exp.config.data.label_descriptions, exp.label_names)
  data = exp.encode_texts(texts)
  return replace_head(params, description_head(Embedder(exp)(params, data)))
