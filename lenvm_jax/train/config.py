"""Start-up checks of a run config: every problem names the field, before any device work begins.

ml_collections already rejects unknown fields and ill-typed overrides on the command line; this checks values.
"""

import re

import jax

from lenvm_jax.value import targets
from lenvm_jax.data.pipeline import AUTO_GAMMA, PACKING, SOURCES
from lenvm_jax.data.rows import UNFINISHED_POLICIES
from lenvm_jax.model.config import ModelConfig

NONFINITE_POLICIES = ("skip", "stop")


class ConfigError(ValueError):
  pass


def _require(condition: bool, field: str, message: str):
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def validate(config) -> ModelConfig:
  """Raises ConfigError naming the first bad field; returns the typed model config (gamma "auto" / "auto_mre" stays
  unresolved here: the trainer resolves it from the data, see pipeline.resolve_gamma)."""
  gamma = config.model.gamma
  _require(gamma in AUTO_GAMMA or (isinstance(gamma, (int, float)) and not isinstance(gamma, bool)), "model.gamma",
           f"must be a number in (0, 1), 'auto' or 'auto_mre', got {gamma!r}")
  try:
    model = ModelConfig.from_config({**config.model, "gamma": 0.5 if gamma in AUTO_GAMMA else float(gamma)})
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("model.") else f"config.model: {e}") from None

  loss, data, train, optim = config.loss, config.data, config.train, config.optim
  _require(loss.target_type in targets.TARGET_TYPES, "loss.target_type",
           f"must be one of {targets.TARGET_TYPES}, got {loss.target_type!r}")
  _require(0.0 < loss.gae_lambda <= 1.0, "loss.gae_lambda", f"must lie in (0, 1], got {loss.gae_lambda}")
  _require(loss.gae_lambda == 1.0 or loss.target_type == "discounted", "loss.gae_lambda",
           "GAE targets (gae_lambda < 1) need loss.target_type='discounted'")
  _require(loss.lm_weight >= 0.0, "loss.lm_weight", f"must be >= 0, got {loss.lm_weight}")
  _require(isinstance(loss.get("lm_stride", 1), int) and loss.get("lm_stride", 1) >= 1, "loss.lm_stride",
           f"must be an integer >= 1, got {loss.get('lm_stride', 1)!r}")
  _require(loss.get("boundary_weight", 1.0) > 0.0, "loss.boundary_weight",
           f"must be > 0, got {loss.get('boundary_weight', 1.0)}")
  value_weight = loss.get("value_weight", 1.0)  # Absent from config.json of runs older than the field.
  _require(value_weight >= 0.0, "loss.value_weight", f"must be >= 0, got {value_weight}")
  _require(value_weight > 0.0 or loss.lm_weight > 0.0, "loss.value_weight",
           "is 0 and so is loss.lm_weight: nothing to train (set loss.lm_weight > 0 for an LM-only policy)")
  _require(loss.length_normalizer > 0.0, "loss.length_normalizer", f"must be > 0, got {loss.length_normalizer}")

  _require(data.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {data.source!r}")
  if data.source in ("jsonl", "arrayrecord"):
    _require(bool(data.train_path), "data.train_path", f"is required when data.source='{data.source}'")
  if data.source == "tfds":
    _require(bool(data.tfds_data_dir), "data.tfds_data_dir", "is required when data.source='tfds'")
  _require(data.packing in PACKING, "data.packing", f"must be one of {PACKING}, got {data.packing!r}")
  _require(0 <= data.max_prompt_len < data.max_len, "data.max_prompt_len",
           f"must lie in [0, data.max_len), got {data.max_prompt_len}")
  _require(data.packing_bins >= 0, "data.packing_bins", f"must be >= 0, got {data.packing_bins}")
  _require(data.worker_count >= 0, "data.worker_count", f"must be >= 0, got {data.worker_count}")
  _require(data.max_len >= 2, "data.max_len", f"must be >= 2, got {data.max_len}")
  _require(data.unfinished in UNFINISHED_POLICIES, "data.unfinished",
           f"must be one of {UNFINISHED_POLICIES}, got {data.unfinished!r}")
  _require(data.unfinished != "infinite" or loss.target_type == "discounted", "data.unfinished",
           "'infinite' (target -1) needs loss.target_type='discounted'; length targets have no infinity")
  if data.source == "synthetic":
    syn = data.synthetic
    _require(all(0.0 < h < 1.0 for h in syn.hazards), "data.synthetic.hazards", f"must lie in (0, 1), got {syn.hazards}")
    _require(0.0 <= syn.switch_prob < 1.0, "data.synthetic.switch_prob", f"must lie in [0, 1), got {syn.switch_prob}")
    _require(syn.train_records > 0 and syn.eval_records > 0, "data.synthetic.train_records",
             "train_records and eval_records must be positive")

  _require(train.steps > 0, "train.steps", f"must be positive, got {train.steps}")
  _require(train.batch_size > 0, "train.batch_size", f"must be positive, got {train.batch_size}")
  _require(train.accum_steps > 0 and train.batch_size % train.accum_steps == 0, "train.accum_steps",
           f"must divide train.batch_size ({train.batch_size}), got {train.accum_steps}")
  _require(train.eval_batch_size > 0, "train.eval_batch_size", f"must be positive, got {train.eval_batch_size}")
  _require(train.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = only at the end), got {train.eval_every}")
  _require(train.log_every > 0, "train.log_every", f"must be positive, got {train.log_every}")
  ema_decay = train.get("ema_decay", 0.0)  # Absent from config.json of runs older than the field.
  _require(0.0 <= ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1) (0 = no EMA), got {ema_decay}")
  _require(train.nonfinite in NONFINITE_POLICIES, "train.nonfinite",
           f"must be one of {NONFINITE_POLICIES}, got {train.nonfinite!r}")

  _require(optim.lr > 0.0, "optim.lr", f"must be positive, got {optim.lr}")
  _require(optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {optim.warmup_steps}")
  _require(0.0 <= optim.end_lr_fraction <= 1.0, "optim.end_lr_fraction",
           f"must lie in [0, 1], got {optim.end_lr_fraction}")
  _require(optim.clip_norm > 0.0, "optim.clip_norm", f"must be positive, got {optim.clip_norm}")
  _require(optim.weight_decay >= 0.0, "optim.weight_decay", f"must be >= 0, got {optim.weight_decay}")

  _require(config.checkpoint.every_steps > 0, "checkpoint.every_steps",
           f"must be positive, got {config.checkpoint.every_steps}")
  _require(config.checkpoint.keep > 0, "checkpoint.keep", f"must be positive, got {config.checkpoint.keep}")
  return model


def check_workdir(workdir: str):
  """A run's files are written with local file I/O (and orbax under an absolute path), so a URL workdir would land in a
  local folder named after it and vanish with the machine: refuse it and say how to mount the bucket instead."""
  if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", workdir):
    raise ConfigError(f"workdir {workdir!r} is a URL, but checkpoints, metrics and config are written to local paths "
                      "(they would end up under a local folder named after it). Pass a mounted path: Vertex AI "
                      "mounts gs://BUCKET at /gcs/BUCKET; on TPU VMs and GKE mount the bucket with Cloud Storage FUSE.")


def check_batch_fits_mesh(config, mesh):
  """The micro-batch is split over data x fsdp: it must divide evenly (and so must the eval batch)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.batch_size // config.train.accum_steps
  _require(micro % shards == 0, "train.batch_size",
           f"micro-batch {micro} (batch_size / accum_steps) must be a multiple of mesh data x fsdp = {shards}")
  _require(config.train.eval_batch_size % shards == 0, "train.eval_batch_size",
           f"must be a multiple of mesh data x fsdp = {shards}, got {config.train.eval_batch_size}")
  hosts = jax.process_count()  # Each host loads batch_size / hosts rows, split into accum_steps micro-batches.
  _require(config.train.batch_size % (hosts * config.train.accum_steps) == 0, "train.batch_size",
           f"must be a multiple of processes x accum_steps = {hosts} x {config.train.accum_steps}, "
           f"got {config.train.batch_size}")
  _require(config.train.eval_batch_size % hosts == 0, "train.eval_batch_size",
           f"must be a multiple of the process count {hosts}, got {config.train.eval_batch_size}")
