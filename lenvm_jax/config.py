"""The run config, typed: frozen dataclasses built once, at the entry point, from the ml_collections dict.

Users keep writing `--config experiments/configs/<name>.py --config.a.b=value` (ml_collections rejects unknown fields
and ill-typed overrides); the entry point calls `RunConfig.from_dict` once and the library takes only the typed
object. The dataclasses are the single list of fields, defaults and checks: `experiments/configs/base.py` builds its
ml_collections dict from them (`to_config_dict`). Every check raises ConfigError naming `config.<section>.<field>`.

`loss.gamma` may be "auto" or "auto_mre" in a user's config; `value/gamma.py` resolves it from the training split
before anything is built, into a new RunConfig (`with_gamma`); nothing changes a RunConfig after that.

This module imports no jax (launchers and config tooling can use it without the accelerator stack). It is longer
than most (~500 lines) on purpose: every section's fields, defaults and checks in one file are the one list a user
and base.py read.
"""

import dataclasses
import json
import math
import types
import typing

from lenvm_jax.errors import UserError
from lenvm_jax.model_config import ModelConfig, preset_fields

AUTO_GAMMA = ("auto", "auto_mre")  # loss.gamma values resolved from the training split (value/gamma.py).
TARGET_TYPES = ("discounted", "raw_length", "normalized_length", "log_length")
LENGTH_ACTIVATIONS = ("sigmoid", "softplus")  # normalized_length's link: ours / the paper's, the reference's default.
LOSS_KINDS = ("mse", "huber")
SOURCES = ("synthetic", "jsonl", "arrayrecord", "tfds")
PACKING = ("none", "first_fit", "best_fit")
UNFINISHED_POLICIES = ("drop", "infinite", "as_finished", "append_eos", "censored")
PROMPT_CUTS = ("tail", "head", "refuse")  # data.prompt_cut: how a prompt longer than data.max_prompt_len is cut.
BATCHING = ("shuffled", "grouped")
NONFINITE_POLICIES = ("skip", "stop")
FEATURE_CACHE_MODES = ("off", "auto")  # train.feature_cache (lenvm_jax/train/feature_cache.py).
FEATURE_CACHE_DTYPES = ("bfloat16", "float32")
# The eval metrics a run logs that rank checkpoints (all lower-is-better; value/metrics.py computes them).
EVAL_METRICS = ("loss", "value_mse", "length_mae", "length_mre") + tuple(
    f"length_{kind}_at_{fraction}" for kind in ("mae", "mre") for fraction in (0, 25, 50, 75))


class ConfigError(UserError, ValueError):
  """A user's config mistake: the message starts with the field, `config.<section>.<field>: ...`."""


def _require(condition: bool, field: str, message: str):
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The value targets and the training objective (docs/method.md §2-§6)."""
  # Discount of the length return G = -(1 - gamma ** n): a float in (0, 1), "auto" (0.01 ** (1 / L_p99) of the
  # training split) or "auto_mre" (least prompt-boundary MRE of a generator-only predictor on the training split).
  # The resolved value is what config.json records.
  gamma: float | str = 0.98
  target_type: str = "discounted"  # discounted | raw_length | normalized_length | log_length (ablations).
  # Per-token regression loss: "mse" (d ** 2, the paper's) or "huber" (0.5 d ** 2 within huber_delta, linear beyond:
  # the reference trains every target type so, delta 1; for raw lengths that is close to L1).
  kind: str = "mse"
  huber_delta: float = 1.0
  gae_lambda: float = 1.0  # 1 = Monte-Carlo return (the paper); < 1 bootstraps from stop-gradient values.
  lm_weight: float = 0.0  # Weight of a joint next-token cross-entropy on completion tokens.
  lm_stride: int = 1  # Take the LM term on every k-th position only (a 32k-vocab head outweighs a small trunk).
  # The LM term's logits are computed for this many positions of every row at a time, each chunk rematerialised in
  # the backward pass (value/objective.py lm_cross_entropy_sum), so the [tokens, vocab] logits and their gradient
  # never exist whole; 0 = the whole row at once. Same loss and gradients either way.
  lm_chunk: int = 1024
  value_weight: float = 1.0  # Weight of the value MSE; 0 with lm_weight > 0 trains a plain LM (a policy).
  boundary_weight: float = 1.0  # Each prompt-boundary state s_0 counts as this many tokens in the value MSE.
  # Only for target_type='normalized_length': the target is n / length_normalizer (unclipped, as the reference);
  # 0 = the longest completion in the training split, resolved at the start (value/gamma.resolve) like gamma; > 0 =
  # that constant, never read from the data (the reference's convention: its lenvm_length_normalizer, default 1).
  length_normalizer: float = 0.0
  # normalized_length's prediction: sigmoid(z) (the paper's section 5.1: reaches at most 1, so it needs the longest
  # length as normaliser) or softplus(z) (the reference's default for its length target: unbounded, so any constant).
  length_activation: str = "sigmoid"
  # Weight of the candidate-value loss (needs model.candidate_head): Q(s_t, a) of the realised next token a regresses
  # on the next state's target, a token mean like the value loss. 0 = off (no head, today's graph).
  candidate_weight: float = 0.0
  # data.unfinished='censored' only: instead of the one-sided bound alone, a cut completion's positions regress on the
  # return bootstrapped from the model's own value at its last kept state (a time limit, not an end), capped by the
  # bound (value/targets.py censored_bootstrap_targets). Discounted target only.
  censored_bootstrap: bool = False

  def __post_init__(self):
    gamma = self.gamma
    _require(gamma in AUTO_GAMMA or (_is_number(gamma) and 0.0 < gamma < 1.0), "loss.gamma",
             f"must be a number in (0, 1), 'auto' or 'auto_mre', got {gamma!r}")
    _require(self.target_type in TARGET_TYPES, "loss.target_type",
             f"must be one of {TARGET_TYPES}, got {self.target_type!r}")
    _require(0.0 < self.gae_lambda <= 1.0, "loss.gae_lambda", f"must lie in (0, 1], got {self.gae_lambda}")
    _require(self.gae_lambda == 1.0 or self.target_type == "discounted", "loss.gae_lambda",
             "GAE targets (gae_lambda < 1) need loss.target_type='discounted'")
    _require(self.lm_weight >= 0.0, "loss.lm_weight", f"must be >= 0, got {self.lm_weight}")
    _require(isinstance(self.lm_stride, int) and self.lm_stride >= 1, "loss.lm_stride",
             f"must be an integer >= 1, got {self.lm_stride!r}")
    _require(isinstance(self.lm_chunk, int) and self.lm_chunk >= 0, "loss.lm_chunk",
             f"must be an integer >= 0 (0 = the whole row), got {self.lm_chunk!r}")
    _require(self.boundary_weight > 0.0, "loss.boundary_weight", f"must be > 0, got {self.boundary_weight}")
    _require(self.value_weight >= 0.0, "loss.value_weight", f"must be >= 0, got {self.value_weight}")
    _require(self.value_weight > 0.0 or self.lm_weight > 0.0, "loss.value_weight",
             "is 0 and so is loss.lm_weight: nothing to train (set loss.lm_weight > 0 for an LM-only policy)")
    _require(self.length_normalizer >= 0.0, "loss.length_normalizer",
             f"must be >= 0 (0 = the longest training completion), got {self.length_normalizer}")
    _require(self.kind in LOSS_KINDS, "loss.kind", f"must be one of {LOSS_KINDS}, got {self.kind!r}")
    _require(self.length_activation in LENGTH_ACTIVATIONS, "loss.length_activation",
             f"must be one of {LENGTH_ACTIVATIONS}, got {self.length_activation!r}")
    _require(_is_number(self.huber_delta) and self.huber_delta > 0.0, "loss.huber_delta",
             f"must be a number > 0, got {self.huber_delta!r}")
    _require(_is_number(self.candidate_weight) and self.candidate_weight >= 0.0, "loss.candidate_weight",
             f"must be a number >= 0, got {self.candidate_weight!r}")

  @property
  def gamma_resolved(self) -> bool:
    return self.gamma not in AUTO_GAMMA

  @property
  def resolved(self) -> bool:
    """Nothing left to read from the training split: gamma is a number, and so is the length normaliser if the
    target needs one."""
    return self.gamma_resolved and (self.target_type != "normalized_length" or self.length_normalizer > 0)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The synthetic generator (data.source='synthetic'): hidden stop modes with an exactly solvable value."""
  hazards: tuple[float, ...] = (0.01, 0.03, 0.08, 0.25)  # Stop probability per token in each hidden mode.
  switch_prob: float = 0.04  # Probability that a completion token switches the mode.
  train_records: int = 200_000
  eval_records: int = 1024
  # Completions drawn per prompt (records come in groups of this many with one prompt id); 1 = every record its
  # own prompt. Prompt-boundary MRE and the samples-per-prompt experiments need more.
  samples_per_prompt: int = 1
  # > 0: every training completion longer than this is cut to it and unfinished (a generator's token limit: the long
  # ones get cut), for studying data.unfinished on data whose exact values are known; the eval split stays whole.
  train_budget: int = 0

  def __post_init__(self):
    object.__setattr__(self, "hazards", tuple(float(h) for h in self.hazards))
    _require(bool(self.hazards) and all(0.0 < h < 1.0 for h in self.hazards), "data.synthetic.hazards",
             f"must be values in (0, 1), got {self.hazards}")
    _require(0.0 <= self.switch_prob < 1.0, "data.synthetic.switch_prob", f"must lie in [0, 1), got {self.switch_prob}")
    _require(self.train_records > 0 and self.eval_records > 0, "data.synthetic.train_records",
             "train_records and eval_records must be positive")
    _require(isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 1,
             "data.synthetic.samples_per_prompt", f"must be an integer >= 1, got {self.samples_per_prompt!r}")
    _require(self.train_budget >= 0, "data.synthetic.train_budget",
             f"must be >= 0 (0 = none), got {self.train_budget}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"  # synthetic | jsonl | arrayrecord | tfds
  train_path: str = ""  # jsonl: a file; arrayrecord: a shard file, a glob, or <prepare_data dir>/train.
  eval_path: str = ""  # Held-out split, same forms; empty = no eval.
  tfds_name: str = "lenvm_trajectories"  # data.source='tfds': a prepared TFDS dataset's name ...
  tfds_data_dir: str = ""  # ... and its data_dir (see lenvm_jax/data/tfds_builder.py).
  max_len: int = 128  # Row length; longer sequences are cut, keeping their true remaining lengths.
  max_prompt_len: int = 0  # > 0: cut longer prompts to this length (data.prompt_cut); 0: a prompt >= max_len is an error.
  # A prompt longer than max_prompt_len: "tail" keeps its last tokens (the context next to s_0), "head" its first
  # (the reference's), "refuse" stops with an error naming the record. The trainer prints how many were cut.
  prompt_cut: str = "tail"
  packing: str = "first_fit"  # first_fit | best_fit | none: several trajectories per row, kept apart.
  packing_bins: int = 0  # Rows open for packing at once; 0 = the rows of one batch.
  # Completions without EOS: drop | infinite (target -1) | as_finished (the last generated token gets n = 0) |
  # append_eos (data.eos_id is appended, as the reference's chat template does, so the EOS gets n = 0) |
  # censored (kept as cut: each position's true remainder is only bounded below, a one-sided loss; value/objective.py).
  unfinished: str = "drop"
  eos_id: int = -1  # The token data.unfinished='append_eos' appends; -1 = none (only that policy needs one).
  seed: int = 0  # Shuffle order (and synthetic sampling).
  # Order of training records: "shuffled" (every epoch a fresh permutation of records; the paper's choice) or
  # "grouped" (every epoch a fresh order of prompt groups, each group's samples one after another, so a batch holds
  # whole groups: the paper's figure 5b comparison).
  batching: str = "shuffled"
  # Deterministic subsets of the training split (data/subsets.py; 0 = all): at most max_prompts prompt groups (a
  # seeded choice, nested: a smaller subset lies inside a larger one) and the first samples_per_prompt samples of each.
  max_prompts: int = 0
  samples_per_prompt: int = 0
  read_threads: int = 1
  worker_count: int = 0  # Processes that prepare batches ahead (grain mp_prefetch); 0 = in-process threads.
  prefetch: int = 4  # Batches prepared ahead by grain threads.
  synthetic: SyntheticConfig = SyntheticConfig()

  def __post_init__(self):
    _require(self.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {self.source!r}")
    if self.source in ("jsonl", "arrayrecord"):
      _require(bool(self.train_path), "data.train_path", f"is required when data.source='{self.source}'")
    if self.source == "tfds":
      _require(bool(self.tfds_data_dir), "data.tfds_data_dir", "is required when data.source='tfds'")
    _require(self.packing in PACKING, "data.packing", f"must be one of {PACKING}, got {self.packing!r}")
    _require(self.max_len >= 2, "data.max_len", f"must be >= 2, got {self.max_len}")
    _require(0 <= self.max_prompt_len < self.max_len, "data.max_prompt_len",
             f"must lie in [0, data.max_len), got {self.max_prompt_len}")
    _require(self.packing_bins >= 0, "data.packing_bins", f"must be >= 0, got {self.packing_bins}")
    _require(self.worker_count >= 0, "data.worker_count", f"must be >= 0, got {self.worker_count}")
    _require(self.unfinished in UNFINISHED_POLICIES, "data.unfinished",
             f"must be one of {UNFINISHED_POLICIES}, got {self.unfinished!r}")
    _require(self.prompt_cut in PROMPT_CUTS, "data.prompt_cut",
             f"must be one of {PROMPT_CUTS}, got {self.prompt_cut!r}")
    _require(self.unfinished != "append_eos" or self.eos_id >= 0, "data.eos_id",
             f"must be a token id >= 0 when data.unfinished='append_eos' (the EOS it appends), got {self.eos_id}")
    _require(self.eos_id >= -1, "data.eos_id", f"must be a token id >= 0, or -1 for none, got {self.eos_id}")
    _require(self.batching in BATCHING, "data.batching", f"must be one of {BATCHING}, got {self.batching!r}")
    _require(self.max_prompts >= 0, "data.max_prompts", f"must be >= 0 (0 = all), got {self.max_prompts}")
    _require(self.samples_per_prompt >= 0, "data.samples_per_prompt",
             f"must be >= 0 (0 = all), got {self.samples_per_prompt}")

  @property
  def has_eval(self) -> bool:
    """Synthetic and TFDS data always have an eval split; files only when data.eval_path names one."""
    return self.source in ("synthetic", "tfds") or bool(self.eval_path)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000  # Optimizer steps; 0 with train.epochs > 0 (exactly one of them is set).
  # > 0 (with train.steps=0): train this many passes over the training records that become rows (dropped unfinished
  # ones do not count); the trainer derives the steps from the split's size (packed: records per row from a packing
  # simulation, lenvm_jax/data/cut_report.py) and records them in config.json as train.steps.
  epochs: float = 0.0
  batch_size: int = 32  # Global batch, in rows.
  accum_steps: int = 1  # Micro-batches per step (gradient accumulation); must divide batch_size.
  eval_batch_size: int = 64
  eval_every: int = 500  # 0 = evaluate only at the end.
  log_every: int = 50
  freeze_trunk: bool = False  # Train only the value head.
  # > 0: train only the top K decoder layers, the final norm and the heads (embeddings and lower layers frozen, with
  # no optimizer state); 0 trains everything. For a pretrained trunk (model.init_from) on a small machine.
  trainable_layers: int = 0
  # > 0: keep an exponential moving average of the weights (decay per step, ramped up over the first steps); eval,
  # prediction, export and rollouts then use it. It averages out the step-to-step noise of the final weights.
  ema_decay: float = 0.0
  nonfinite: str = "skip"  # A non-finite loss/gradient: skip the update and count it, or stop.
  # With nonfinite='skip': stop with an error once this many steps in a row were skipped (the run has diverged and
  # would only spin); 0 = never.
  max_nonfinite_streak: int = 20
  # "auto": with frozen bottom layers (trainable_layers or freeze_trunk), their output is computed once per training
  # record into an on-disk cache and the steps run only the layers above it (train/feature_cache.py; disk: hidden x
  # 2 bytes per token in bfloat16); "off": every step runs the whole trunk.
  feature_cache: str = "off"
  feature_cache_dir: str = ""  # Where the cache lives; "" = <workdir>/feature_cache.
  feature_cache_dtype: str = "bfloat16"  # float32: the frozen layers' output unrounded (float32 models, exact tests).

  def __post_init__(self):
    _require(self.steps >= 0 and self.epochs >= 0, "train.steps" if self.steps < 0 else "train.epochs",
             f"must be >= 0, got {self.steps if self.steps < 0 else self.epochs}")
    _require(self.steps > 0 or self.epochs > 0, "train.steps",
             "must be positive, or 0 with train.epochs > 0 (passes over the training split), got 0")
    _require(not (self.steps > 0 and self.epochs > 0), "train.epochs",
             f"is {self.epochs} and train.steps is {self.steps}: set exactly one (train.steps=0 sizes the run by "
             "epochs)")
    _require(self.batch_size > 0, "train.batch_size", f"must be positive, got {self.batch_size}")
    _require(self.accum_steps > 0 and self.batch_size % self.accum_steps == 0, "train.accum_steps",
             f"must divide train.batch_size ({self.batch_size}), got {self.accum_steps}")
    _require(self.eval_batch_size > 0, "train.eval_batch_size", f"must be positive, got {self.eval_batch_size}")
    _require(self.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = only at the end), got {self.eval_every}")
    _require(self.log_every > 0, "train.log_every", f"must be positive, got {self.log_every}")
    _require(self.trainable_layers >= 0, "train.trainable_layers",
             f"must be >= 0 (0 = all layers), got {self.trainable_layers}")
    _require(not (self.trainable_layers and self.freeze_trunk), "train.trainable_layers",
             "and train.freeze_trunk both freeze the trunk: set one (freeze_trunk trains the heads only)")
    _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
    _require(self.nonfinite in NONFINITE_POLICIES, "train.nonfinite",
             f"must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
    _require(self.feature_cache in FEATURE_CACHE_MODES, "train.feature_cache",
             f"must be one of {FEATURE_CACHE_MODES}, got {self.feature_cache!r}")
    _require(self.feature_cache_dtype in FEATURE_CACHE_DTYPES, "train.feature_cache_dtype",
             f"must be one of {FEATURE_CACHE_DTYPES}, got {self.feature_cache_dtype!r}")
    _require(isinstance(self.max_nonfinite_streak, int) and self.max_nonfinite_streak >= 0,
             "train.max_nonfinite_streak",
             f"must be an integer >= 0 (0 = never stop), got {self.max_nonfinite_streak!r}")

  @property
  def keeps_ema(self) -> bool:
    return self.ema_decay > 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay, global-norm clipping (train/optimizer.py)."""
  lr: float = 1e-3
  warmup_steps: int = 100
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0

  def __post_init__(self):
    _require(self.lr > 0.0, "optim.lr", f"must be positive, got {self.lr}")
    _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
    _require(0.0 <= self.end_lr_fraction <= 1.0, "optim.end_lr_fraction",
             f"must lie in [0, 1], got {self.end_lr_fraction}")
    _require(self.clip_norm > 0.0, "optim.clip_norm", f"must be positive, got {self.clip_norm}")
    _require(self.weight_decay >= 0.0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
    for name in ("b1", "b2"):
      _require(0.0 <= getattr(self, name) < 1.0, f"optim.{name}", f"must lie in [0, 1), got {getattr(self, name)}")
    _require(self.eps > 0.0, "optim.eps", f"must be positive, got {self.eps}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500
  keep: int = 3
  async_save: bool = True
  # An eval metric (lower is better): besides the last `keep`, keep the checkpoint with its least value; eval steps
  # are then checkpointed too, and predict / export_hf / evaluate take --step=best. "" = off.
  keep_best: str = ""

  def __post_init__(self):
    _require(self.every_steps > 0, "checkpoint.every_steps", f"must be positive, got {self.every_steps}")
    _require(self.keep > 0, "checkpoint.keep", f"must be positive, got {self.keep}")
    _require(self.keep_best in ("",) + EVAL_METRICS, "checkpoint.keep_best",
             f"must be '' (off) or an eval metric ({', '.join(EVAL_METRICS)}), got {self.keep_best!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1 takes the devices that the other axes leave.
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig
  loss: LossConfig = LossConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  optim: OptimConfig = OptimConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  seed: int = 0  # Parameter init and RNG state.

  def __post_init__(self):
    _require(self.data.unfinished != "infinite" or self.loss.target_type == "discounted", "data.unfinished",
             "'infinite' (target -1) needs loss.target_type='discounted'; length targets have no infinity")
    censored = self.data.unfinished == "censored"
    _require(not self.loss.censored_bootstrap or (censored and self.loss.target_type == "discounted"),
             "loss.censored_bootstrap", "needs data.unfinished='censored' and loss.target_type='discounted'")
    _require(not censored or self.loss.gae_lambda == 1.0, "data.unfinished",
             "'censored' bounds the Monte-Carlo return; GAE targets (loss.gae_lambda < 1) are not bounds: set one")
    _require(not censored or self.loss.candidate_weight == 0.0, "data.unfinished",
             "'censored' has no candidate-value loss (its next-state targets are bounds): set loss.candidate_weight=0")
    _require(self.data.eos_id < self.model.vocab_size, "data.eos_id",
             f"must lie inside the vocabulary [0, {self.model.vocab_size}) (model.vocab_size), got {self.data.eos_id}")
    _require(not self.checkpoint.keep_best or self.data.has_eval, "checkpoint.keep_best",
             "ranks checkpoints by an eval metric, but the run has no eval split (set data.eval_path)")
    _require(self.train.trainable_layers <= self.model.num_layers, "train.trainable_layers",
             f"must be at most model.num_layers ({self.model.num_layers}), got {self.train.trainable_layers}")
    has_head = self.model.candidate_head != "none"
    _require(has_head or self.loss.candidate_weight == 0.0, "model.candidate_head",
             f"is 'none' but loss.candidate_weight is {self.loss.candidate_weight}: set model.candidate_head to "
             "'table' (its own per-token vectors) or 'tied' (the input embedding)")
    _require(not has_head or self.loss.candidate_weight > 0.0, "loss.candidate_weight",
             f"is 0 but model.candidate_head is {self.model.candidate_head!r}: the head would never train; set "
             "loss.candidate_weight > 0 (e.g. 1.0) or model.candidate_head='none'")

  @classmethod
  def from_dict(cls, config) -> "RunConfig":
    """From an ml_collections ConfigDict or a plain nested dict (a config.json). Fields a section lacks take their
    defaults, so config.json files of runs older than a field still load; unknown fields are errors."""
    if not isinstance(config, dict) and not hasattr(config, "to_dict"):
      raise ConfigError(f"config: must be a dict of sections (model, loss, data, ...), got {type(config).__name__}")
    return _build(cls, _to_plain(config), "")

  @classmethod
  def default(cls, preset: str = "small") -> "RunConfig":
    """The defaults with a model preset's shapes (and a 64-token vocabulary: the synthetic generator's)."""
    return cls(model=ModelConfig(**{**preset_fields(preset), "vocab_size": 64}))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def with_gamma(self, gamma: float) -> "RunConfig":
    """The same run with its discount resolved (value/gamma.py)."""
    return dataclasses.replace(self, loss=dataclasses.replace(self.loss, gamma=float(gamma)))


# Fields that moved between sections; config.json files of older runs name them at their old place.
_MOVED = {("model", "gamma"): ("loss", "gamma")}


def _to_plain(config) -> dict:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  config = json.loads(json.dumps(config, default=list))  # Tuples -> lists, FieldReferences resolved, a deep copy.
  for (old_section, old_name), (new_section, new_name) in _MOVED.items():
    old = config.get(old_section, {})
    if isinstance(old, dict) and old_name in old:
      value = old.pop(old_name)
      config.setdefault(new_section, {}).setdefault(new_name, value)
  return config


def _build(cls, values, prefix: str):
  """A dataclass from nested plain values; nested dataclass fields recurse; errors name the dotted field."""
  where = prefix.rstrip(".") or "config"
  if not isinstance(values, dict):
    raise ConfigError(f"config.{where}: must be a section (a dict), got {values!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"config.{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
  kwargs = {}
  for name, value in values.items():
    _require_finite(value, f"{prefix}{name}")
    field_type = _field_types(cls)[name]
    _require(dataclasses.is_dataclass(field_type) or _has_type(value, field_type), f"{prefix}{name}",
             f"must be {_type_name(field_type)}, got {value!r}")
    if dataclasses.is_dataclass(field_type):
      kwargs[name] = _build(field_type, value, f"{prefix}{name}.")
    elif typing.get_origin(field_type) is tuple:
      kwargs[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    else:
      kwargs[name] = value
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:  # ModelConfig's own checks say "model.<field> ...".
    message = str(e)
    raise ConfigError(f"config.{message}" if prefix and message.startswith(prefix)
                      else f"config.{where}: {message}") from None


def _has_type(value, hint) -> bool:
  """Whether a plain value (from a config file or config.json) fits a field's annotation: an int is a float too, a
  bool is not a number, a list is a tuple."""
  if hint is type(None):
    return value is None
  if hint is float:
    return _is_number(value)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint in (bool, str):
    return isinstance(value, hint)
  if typing.get_origin(hint) in (types.UnionType, typing.Union):
    return any(_has_type(value, arg) for arg in typing.get_args(hint))
  if typing.get_origin(hint) is tuple:
    args = typing.get_args(hint)
    items_fit = len(args) != 2 or args[1] is not Ellipsis or all(_has_type(item, args[0]) for item in value)
    return isinstance(value, (list, tuple)) and items_fit
  return True


def _type_name(hint) -> str:
  names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "None"}
  if typing.get_origin(hint) in (types.UnionType, typing.Union):
    return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
  if typing.get_origin(hint) is tuple:
    args = typing.get_args(hint)
    return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s" if len(args) == 2 and args[1] is Ellipsis else "a list"
  return names.get(hint, str(hint))


def _require_finite(value, field: str):
  """No config value is meaningfully infinite or NaN (a learning rate of inf trains NaN weights): refuse them all,
  in lists too, before any section's own checks."""
  if isinstance(value, float):
    _require(math.isfinite(value), field, f"must be a finite number, got {value}")
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      _require_finite(item, f"{field}[{i}]")


def _field_types(cls) -> dict:
  return typing.get_type_hints(cls)


def to_config_dict(run: RunConfig):
  """The ml_collections dict that config files start from (`--config.a.b=value` overrides), from the dataclass
  defaults. Fields that take several types (loss.gamma: a float or "auto") accept any value on the command line;
  the typed config checks them."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

  def section(obj):
    out = ml_collections.ConfigDict()
    hints = _field_types(type(obj))
    for field in dataclasses.fields(obj):
      value = getattr(obj, field.name)
      if dataclasses.is_dataclass(value):
        out[field.name] = section(value)
      elif isinstance(hints[field.name], types.UnionType):
        out[field.name] = config_dict.FieldReference(value, field_type=object)
      else:
        out[field.name] = value
    return out

  return section(run)


def check_batch_fits_mesh(run: RunConfig, mesh, process_count: int):
  """The micro-batch is split over data x fsdp: it must divide evenly (and so must the eval batch); each host loads
  batch_size / hosts rows, split into accum_steps micro-batches."""
  train = run.train
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = train.batch_size // train.accum_steps
  _require(micro % shards == 0, "train.batch_size",
           f"micro-batch {micro} (batch_size / accum_steps) must be a multiple of mesh data x fsdp = {shards}")
  _require(train.eval_batch_size % shards == 0, "train.eval_batch_size",
           f"must be a multiple of mesh data x fsdp = {shards}, got {train.eval_batch_size}")
  _require(train.batch_size % (process_count * train.accum_steps) == 0, "train.batch_size",
           f"must be a multiple of processes x accum_steps = {process_count} x {train.accum_steps}, "
           f"got {train.batch_size}")
  _require(train.eval_batch_size % process_count == 0, "train.eval_batch_size",
           f"must be a multiple of the process count {process_count}, got {train.eval_batch_size}")
