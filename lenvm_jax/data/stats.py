"""Completion-length statistics of a trajectory set (percentiles per generator, unfinished share), and the
stats.json that prepare_data and rollouts write beside their shards. The gamma they suggest is value/gamma.py's."""

import collections
import json
import os

import numpy as np

from lenvm_jax import files
from lenvm_jax.data.prompt_groups import generator_of


def length_summary(lengths) -> dict:
  lengths = np.asarray(lengths, np.float64)
  if not len(lengths):
    return {"count": 0}
  p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
  return {"count": int(len(lengths)), "mean": float(lengths.mean()), "p50": float(p50), "p90": float(p90),
          "p99": float(p99), "max": int(lengths.max())}


def trajectory_stats(trajectories) -> dict:
  """Per-generator and overall completion-length summaries of finished trajectories, and the unfinished share."""
  by_generator = collections.defaultdict(list)
  unfinished = collections.Counter()
  total = collections.Counter()
  for t in trajectories:
    name = generator_of(t)
    total[name] += 1
    if t.finished:
      by_generator[name].append(len(t.completion_ids))
    else:
      unfinished[name] += 1
  everything = [n for lengths in by_generator.values() for n in lengths]
  overall = length_summary(everything)
  return {
      "overall": {**overall, "unfinished": sum(unfinished.values()), "records": sum(total.values()),
                  "unfinished_fraction": sum(unfinished.values()) / max(sum(total.values()), 1)},
      "generators": {name: {**length_summary(by_generator[name]), "unfinished": unfinished[name],
                            "unfinished_fraction": unfinished[name] / total[name]} for name in sorted(total)},
  }


def write_json(path: str, obj: dict) -> None:
  """Indented, keys sorted, written through files.write_atomic (a reader never sees half a file, a planted link is
  replaced, not followed)."""
  files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_stats(output_dir: str, kept: dict, shards: dict, skipped: dict | None = None, **extra) -> dict:
  """<output_dir>/stats.json, returned: per split ({split: trajectories}) its record and shard counts and
  trajectory_stats, the bad records skipped ({field: count}), and `extra` (rollouts add their "generation")."""
  skipped = dict(skipped or {})
  result = {
      "records": {split: len(trajectories) for split, trajectories in kept.items()},
      "shards": dict(shards),
      "skipped": {"total": sum(skipped.values()), "by_field": skipped},
      "splits": {split: trajectory_stats(trajectories) for split, trajectories in kept.items() if trajectories},
      **extra,
  }
  write_json(os.path.join(output_dir, "stats.json"), result)
  return result
