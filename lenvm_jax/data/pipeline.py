"""Data sources -> grain pipelines of fixed-shape row batches, with a checkpointable iterator.

`data.source` picks where trajectories come from; everything after that is one grain pipeline:
MapDataset(source) -> global shuffle (re-drawn each epoch) -> repeat -> this host's slice -> [drop unfinished]
-> rows -> [first-fit or best-fit packing] -> batch -> [worker processes (data.worker_count)].
"""

import functools
import logging

import grain
import jax
import numpy as np

from lenvm_jax.evaluation import prompt_boundary
from lenvm_jax.data import arrayrecord, jsonl, rows, stats, synthetic

SOURCES = ("synthetic", "jsonl", "arrayrecord", "tfds")
PACKERS = {"first_fit": grain.experimental.FirstFitPackIterDataset, "best_fit": grain.experimental.BestFitPackIterDataset}
PACKING = ("none",) + tuple(PACKERS)
AUTO_GAMMA = ("auto", "auto_mre")  # model.gamma values that resolve_gamma computes from the training split.
# Trajectories sampled to resolve model.gamma = "auto" / "auto_mre" (all of them when the split is smaller).
GAMMA_SAMPLE = 20_000


def synthetic_policy(config) -> synthetic.SyntheticPolicy:
  """The synthetic generator speaks the model's vocabulary (model.vocab_size)."""
  return synthetic.SyntheticPolicy(vocab_size=config.model.vocab_size,
                                   hazards=tuple(config.data.synthetic.hazards),
                                   switch_prob=config.data.synthetic.switch_prob)


def load_source(config, split: str):
  """The trajectories of a split ("train" or "eval") as a random-access sequence."""
  data = config.data
  if data.source == "synthetic":
    policy = synthetic_policy(config)
    size = data.synthetic.train_records if split == "train" else data.synthetic.eval_records
    # Distinct seed streams per split: eval trajectories are never training trajectories.
    return synthetic.SyntheticSource(policy, size, seed=data.seed * 2 + (split == "eval"), gamma=config.model.gamma)
  path = data.train_path if split == "train" else data.eval_path
  if data.source == "jsonl":
    # With max_prompt_len, long prompts are cut when rows are built, so the reader does not reject them.
    records = jsonl.read_trajectories(path, config.model.vocab_size, data.max_len if not data.max_prompt_len else 1 << 30)
    unfinished = sum(not r.finished for r in records)
    if unfinished:
      logging.warning("%s: %d of %d completions are unfinished (data.unfinished=%s)", path, unfinished,
                      len(records), data.unfinished)
    return records
  if data.source == "arrayrecord":
    return arrayrecord.ArrayRecordTrajectories(path)
  if data.source == "tfds":
    from lenvm_jax.data import tfds_builder  # Imports tensorflow_datasets (slow): only when asked for.
    return tfds_builder.TfdsTrajectories(data.tfds_name, split, data.tfds_data_dir)
  raise ValueError(f"data.source must be one of {SOURCES}, got {data.source!r}")


def resolve_gamma(config) -> float:
  """model.gamma from the training split's finished completions.

  "auto": gamma = 0.01 ** (1 / L_p99) (spec section 1). "auto_mre": the gamma with the least prompt-boundary MRE for
  a LenVM that knows only the generator (prompt_boundary.least_mre_gamma), for jobs judged by prompt-boundary MRE.
  """
  mode = config.model.gamma
  if config.data.source == "synthetic":
    policy = synthetic_policy(config)  # Lengths do not depend on gamma: sample the policy directly.
    sample = [policy.sample(np.random.default_rng([config.data.seed * 2, i])) for i in range(
        min(GAMMA_SAMPLE, config.data.synthetic.train_records))]
  else:
    source = load_source(config, "train")
    step = max(len(source) // GAMMA_SAMPLE, 1)
    sample = [source[i] for i in range(0, len(source), step)]
  if mode == "auto_mre":
    gamma, mre = prompt_boundary.least_mre_gamma(prompt_boundary.group_by_prompt(sample))
    logging.info("model.gamma=auto_mre: least training prompt-boundary MRE %.4f over %d completions -> gamma=%.6f",
                 mre, len(sample), gamma)
    return gamma
  summary = stats.trajectory_stats(sample)["overall"]
  if summary["count"] == 0:
    raise ValueError("model.gamma='auto' needs finished completions in the training split; there are none")
  gamma = stats.suggested_gamma(summary["p99"])
  logging.info("model.gamma=auto: L_p99=%.0f over %d completions -> gamma=%.6f", summary["p99"], summary["count"],
               gamma)
  return gamma


def _is_finished(trajectory) -> bool:
  return trajectory.finished


def _to_row(trajectory, max_len, unfinished, max_prompt_len, pad):
  row = rows.trajectory_to_row(trajectory, max_len, unfinished, max_prompt_len)
  if pad:
    return rows.pad_row(row, max_len)
  del row["positions"], row["segment_ids"]  # Packing renumbers them.
  return row


def _from_packed(packed: dict) -> dict:
  """grain's packer adds <feature>_segment_ids / _positions per feature; all features share the tokens' ones."""
  row = {k: v for k, v in packed.items() if not k.endswith(("_segment_ids", "_positions"))}
  row["segment_ids"] = packed["tokens_segment_ids"]
  row["positions"] = packed["tokens_positions"]
  return row


def _rows(ds: grain.MapDataset, config, rows_per_batch: int) -> grain.IterDataset:
  """Trajectories -> fixed-length rows: padded one per row, or packed several per row into data.packing_bins open
  rows (default: one per row of the batch; more bins pack tighter, see experiments/data_stats.py --sweep_bins)."""
  data = config.data
  if data.unfinished == "drop":
    ds = ds.filter(_is_finished)
  ds = ds.map(functools.partial(_to_row, max_len=data.max_len, unfinished=data.unfinished,
                                max_prompt_len=data.max_prompt_len, pad=data.packing == "none"))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch))
  if data.packing == "none":
    return ds
  fields = rows.PACKED_FIELDS + (("exact_value",) if data.source == "synthetic" else ())
  lengths = {k: data.max_len for k in fields}
  packed = PACKERS[data.packing](ds, length_struct=lengths, num_packing_bins=data.packing_bins or rows_per_batch,
                                 seed=data.seed, shuffle_bins=False)
  return packed.map(_from_packed)


def train_dataset(config, source) -> grain.IterDataset:
  """Endless shuffled batches of this host's share of the global batch."""
  per_host = config.train.batch_size // jax.process_count()
  ds = grain.MapDataset.source(source).seed(config.data.seed).shuffle().repeat(None)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = _rows(ds, config, per_host).batch(per_host, drop_remainder=True)
  if config.data.worker_count:
    # Worker processes run the pipeline above; the checkpointed iterator state covers what they prefetched.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return ds


def eval_batches(config, source):
  """One pass over this host's eval slice, in order; the last batch is padded with empty rows (no valid tokens)."""
  per_host = config.train.eval_batch_size // jax.process_count()
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  for batch in _rows(ds, config, per_host).batch(per_host, drop_remainder=False):
    short = per_host - len(batch["tokens"])
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    yield batch
