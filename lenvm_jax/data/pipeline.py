"""Data sources -> grain pipelines of fixed-shape row batches, with a checkpointable iterator.

`data.source` picks where trajectories come from; everything after that is one grain pipeline:
MapDataset(source) -> global shuffle (re-drawn each epoch) -> repeat -> this host's slice -> [drop unfinished]
-> rows -> [first-fit or best-fit packing] -> batch -> [worker processes (data.worker_count)].

The training split can be cut to a deterministic subset of its prompts and samples (data.max_prompts,
data.samples_per_prompt) and read prompt group by prompt group instead of shuffled (data.batching = "grouped");
data/subsets.py.
"""

import functools
import logging

import grain
import jax
import numpy as np

from lenvm_jax.config import RunConfig
from lenvm_jax.data import arrayrecord, jsonl, rows, subsets, synthetic

PACKERS = {"first_fit": grain.experimental.FirstFitPackIterDataset, "best_fit": grain.experimental.BestFitPackIterDataset}
# Trajectories sampled to resolve loss.gamma = "auto" / "auto_mre" (all of them when the split is smaller).
GAMMA_SAMPLE = 20_000


def synthetic_policy(run: RunConfig) -> synthetic.SyntheticPolicy:
  """The synthetic generator speaks the model's vocabulary (model.vocab_size)."""
  syn = run.data.synthetic
  return synthetic.SyntheticPolicy(vocab_size=run.model.vocab_size, hazards=syn.hazards, switch_prob=syn.switch_prob)


def load_source(run: RunConfig, split: str):
  """The trajectories of a split ("train" or "eval") as a random-access sequence; the training split cut to
  data.max_prompts / data.samples_per_prompt when they are set (so gamma, stats and training all see the subset).

  Synthetic records carry their exact values under loss.gamma; before gamma is resolved they carry none (their
  lengths, all that the resolution reads, do not depend on it)."""
  source = _load_split(run, split)
  if split != "train":
    return source
  return subsets.training_subset(source, run.data.max_prompts, run.data.samples_per_prompt, run.data.seed)


def _load_split(run: RunConfig, split: str):
  data = run.data
  if data.source == "synthetic":
    size = data.synthetic.train_records if split == "train" else data.synthetic.eval_records
    # Distinct seed streams per split: eval trajectories are never training trajectories.
    return synthetic.SyntheticSource(synthetic_policy(run), size, seed=data.seed * 2 + (split == "eval"),
                                     gamma=run.loss.gamma if run.loss.gamma_resolved else None,
                                     samples_per_prompt=data.synthetic.samples_per_prompt,
                                     budget=data.synthetic.train_budget if split == "train" else 0)
  path = data.train_path if split == "train" else data.eval_path
  if data.source == "jsonl":
    # With max_prompt_len, long prompts are cut when rows are built, so the reader does not reject them.
    records = jsonl.read_trajectories(path, run.model.vocab_size, data.max_len if not data.max_prompt_len else 1 << 30)
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
  raise ValueError(f"data.source must be one of the known sources, got {data.source!r}")


def length_sample(source) -> list:
  """Up to GAMMA_SAMPLE trajectories spread evenly over a split: what gamma is resolved from (value/gamma.py)."""
  stride = max(len(source) // GAMMA_SAMPLE, 1)
  return [source[i] for i in range(0, len(source), stride)]


def _is_finished(item) -> bool:
  return (item[0] if isinstance(item, tuple) else item).finished


# The row field of the frozen layers' cached output [n, H] (train/feature_cache.py); it travels with the tokens
# through padding and packing.
FEATURES = "features"


class WithFeatures:
  """A source whose record i comes with features[i], its frozen-trunk features [n, H] (train/feature_cache.py)."""

  def __init__(self, source, features):
    self.source, self.features = source, features

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.source[index], self.features[index]


def _row_with_features(item, to_row, max_len: int, pad: bool):
  """to_row(trajectory) with the record's cached features [n, H] as the FEATURES field (padded like the rest)."""
  trajectory, features = item
  row = to_row(trajectory)
  n = len(row[rows.TOKENS]) if not pad else int(np.count_nonzero(row[rows.SEGMENT_IDS]))
  if len(features) != n:
    raise ValueError(f"a cached feature record holds {len(features)} positions, its row {n} tokens: the feature "
                     "cache does not belong to these records and settings (config.train.feature_cache_dir)")
  row[FEATURES] = np.pad(features, ((0, max_len - n), (0, 0))) if pad else features
  return row


def _to_row(trajectory, max_len, unfinished, max_prompt_len, pad, eos_id=-1, prompt_cut="tail"):
  row = rows.trajectory_to_row(trajectory, max_len, unfinished, max_prompt_len, eos_id, prompt_cut)
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


def row_maker(run: RunConfig, pad: bool):
  """trajectory -> row under the run's data settings (padded to data.max_len, or unpadded for packing): what training
  reads and what the feature cache (train/feature_cache.py) computes its features from."""
  data = run.data
  return functools.partial(_to_row, max_len=data.max_len, unfinished=data.unfinished,
                           max_prompt_len=data.max_prompt_len, pad=pad, eos_id=data.eos_id, prompt_cut=data.prompt_cut)


def _rows(ds: grain.MapDataset, run: RunConfig, rows_per_batch: int, with_features: bool = False) -> grain.IterDataset:
  """Trajectories -> fixed-length rows: padded one per row, or packed several per row into data.packing_bins open
  rows (default: one per row of the batch; more bins pack tighter, see experiments/data_stats.py --sweep_bins)."""
  data = run.data
  if data.unfinished == "drop":
    ds = ds.filter(_is_finished)
  to_row = row_maker(run, pad=data.packing == "none")
  if with_features:  # Records come as (trajectory, features): WithFeatures.
    to_row = functools.partial(_row_with_features, to_row=to_row, max_len=data.max_len, pad=data.packing == "none")
  ds = ds.map(to_row)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch))
  if data.packing == "none":
    return ds
  fields = (rows.PACKED_FIELDS + ((rows.EXACT_VALUE,) if data.source == "synthetic" else ())
            + ((rows.CENSORED,) if data.unfinished == "censored" else ()) + ((FEATURES,) if with_features else ()))
  lengths = {k: data.max_len for k in fields}
  packed = PACKERS[data.packing](ds, length_struct=lengths, num_packing_bins=data.packing_bins or rows_per_batch,
                                 seed=data.seed, shuffle_bins=False)
  return packed.map(_from_packed)


def _record_at(source, index):
  return source[index]


def train_dataset(run: RunConfig, source, features=None) -> grain.IterDataset:
  """Endless batches of this host's share of the global batch: records shuffled, or grouped by prompt. features:
  record i's cached frozen-trunk features are features[i] (train/feature_cache.py); rows then carry FEATURES."""
  if features is not None:
    source = WithFeatures(source, features)
  per_host = run.train.batch_size // jax.process_count()
  if run.data.batching == "grouped":
    order = subsets.GroupedOrder(subsets.record_groups(source), run.data.seed)
    ds = grain.MapDataset.range(order.size).repeat(None).map_with_index(order)
    ds = ds.map(functools.partial(_record_at, source))
  else:
    ds = grain.MapDataset.source(source).seed(run.data.seed).shuffle().repeat(None)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = _rows(ds, run, per_host, with_features=features is not None).batch(per_host, drop_remainder=True)
  if run.data.worker_count:
    # Worker processes run the pipeline above; the checkpointed iterator state covers what they prefetched.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=run.data.worker_count))
  return ds


def eval_batches(run: RunConfig, source):
  """One pass over this host's eval slice, in order; the last batch is padded with empty rows (no valid tokens)."""
  per_host = run.train.eval_batch_size // jax.process_count()
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  for batch in _rows(ds, run, per_host).batch(per_host, drop_remainder=False):
    short = per_host - len(batch["tokens"])
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    yield batch
