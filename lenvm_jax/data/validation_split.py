"""A validation split carved from a prepared train split, by prompt group: choose settings without the held-out split.

A group is the prompt_id up to the first separator (prompt_groups.problem_of: all settings of a CHAMP problem land on
one side), or the whole prompt_id; groups are assigned with a seeded permutation, as prepare_data splits problems.
Records are copied byte for byte. CLI: experiments/carve_validation.py.
"""

import collections
import json
import os

import grain

from lenvm_jax.data import arrayrecord
from lenvm_jax.data.prompt_groups import problem_of, split_groups


def carve(input_dir: str, output_dir: str, fraction: float, separator: str, seed: int) -> dict:
  """Splits input_dir's train records into output_dir's train and eval; returns {split: record count}."""
  source = grain.sources.ArrayRecordDataSource(arrayrecord.split_paths(os.path.join(input_dir, "train")))
  records = [source[i] for i in range(len(source))]
  groups = [problem_of(json.loads(r).get("prompt_id"), separator) for r in records]
  side = split_groups(sorted(set(groups)), eval_fraction=fraction, seed=seed)
  by_split = collections.defaultdict(list)
  for record, group in zip(records, groups):
    by_split[side[group]].append(record)
  for split in ("train", "eval"):  # Before any write: an empty side is no split to train or choose on.
    if not by_split[split]:
      raise ValueError(f"--fraction={fraction} leaves the {split} side without records ({len(set(groups))} prompt "
                       f"groups in {input_dir}/train): choose a fraction that puts at least one group on each side")
  os.makedirs(output_dir, exist_ok=True)
  for split in ("train", "eval"):
    arrayrecord.write_shard(arrayrecord.shard_path(output_dir, split, 0, 1), by_split[split])
  return {split: len(by_split[split]) for split in ("train", "eval")}
