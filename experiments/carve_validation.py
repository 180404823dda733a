"""Carves a validation split out of a prepare_data train split, by prompt group, so that hyperparameters are chosen
without looking at the held-out split.

  python -m experiments.carve_validation --input_dir=data/champ --output_dir=data/champ_dev --fraction=0.2

Writes <output_dir>/train-* (the rest of the training records) and <output_dir>/eval-* (the validation records, under
the name a config's data.eval_path reads), copied byte for byte. A group is the prompt_id up to the first
--group_separator (CHAMP's "<problem>|<setting>": all settings of a problem land on one side), or the whole prompt_id
when it has none; groups are assigned with a seeded permutation as prepare_data splits problems.
"""

import collections
import json
import os

import grain
from absl import app, flags

from lenvm_jax.data import arrayrecord
from lenvm_jax.data.champ import split_problems

_INPUT = flags.DEFINE_string("input_dir", None, "A prepare_data output directory (its train split is carved).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the new train and eval (validation) shards go.")
_FRACTION = flags.DEFINE_float("fraction", 0.2, "Share of prompt groups that go to validation.")
_SEPARATOR = flags.DEFINE_string("group_separator", "|", "A group is the prompt_id up to this; empty: the prompt_id.")
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the group permutation (prepare_data's CHAMP split uses 0).")
flags.mark_flags_as_required(["input_dir", "output_dir"])


def group_of(prompt_id, separator: str) -> str:
  if prompt_id is None:
    raise ValueError("a record has no prompt_id: cannot keep a prompt's completions on one side")
  return prompt_id.split(separator, 1)[0] if separator else prompt_id


def carve(input_dir: str, output_dir: str, fraction: float, separator: str, seed: int) -> dict:
  """Splits input_dir's train records into output_dir's train and eval; returns {split: record count}."""
  source = grain.sources.ArrayRecordDataSource(arrayrecord.split_paths(os.path.join(input_dir, "train")))
  records = [source[i] for i in range(len(source))]
  groups = [group_of(json.loads(r).get("prompt_id"), separator) for r in records]
  side = split_problems(sorted(set(groups)), eval_fraction=fraction, seed=seed)
  by_split = collections.defaultdict(list)
  for record, group in zip(records, groups):
    by_split[side[group]].append(record)
  os.makedirs(output_dir, exist_ok=True)
  for split in ("train", "eval"):
    arrayrecord.write_shard(arrayrecord.shard_path(output_dir, split, 0, 1), by_split[split])
  return {split: len(by_split[split]) for split in ("train", "eval")}


def main(argv):
  del argv
  counts = carve(_INPUT.value, _OUTPUT.value, _FRACTION.value, _SEPARATOR.value, _SEED.value)
  print(f"{_OUTPUT.value}: train {counts['train']} records, eval (validation) {counts['eval']} records")


if __name__ == "__main__":
  app.run(main)
