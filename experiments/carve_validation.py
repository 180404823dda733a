"""Carves a validation split out of a prepare_data train split, by prompt group, so that hyperparameters are chosen
without looking at the held-out split.

  python -m experiments.carve_validation --input_dir=data/champ --output_dir=data/champ_dev --fraction=0.2

Writes <output_dir>/train-* (the rest of the training records) and <output_dir>/eval-* (the validation records, under
the name a config's data.eval_path reads), copied byte for byte; see lenvm_jax/data/validation_split.py.

The output directory is claimed like prepare_data's (carve.json records the settings): a rerun with the same settings
redoes the carve, another import there is refused unless --overwrite, and the input directory itself (or one that
overlaps it) is always refused.
"""

import os

from absl import flags

from experiments import cli
from lenvm_jax.data import arrayrecord, output_dir, prompt_groups, validation_split

_INPUT = flags.DEFINE_string("input_dir", None, "A prepare_data output directory (its train split is carved).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the new train and eval (validation) shards go.")
_FRACTION = flags.DEFINE_float("fraction", 0.2, "Share of prompt groups that go to validation.")
_SEPARATOR = flags.DEFINE_string("group_separator", prompt_groups.PROMPT_ID_SEPARATOR,
                                 "A group is the prompt_id up to this; empty: the prompt_id.")
_SEED = cli.seed_flag(1, "Seed of the group permutation (prepare_data's CHAMP split uses 0).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace another import in --output_dir instead of refusing.")
flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv):
  del argv
  output_dir.refuse_same_directory(_INPUT.value, _OUTPUT.value, "--input_dir", "--output_dir")
  if not os.path.isdir(_INPUT.value):
    raise output_dir.OutputDirError.at("no such directory", f"--input_dir={_INPUT.value}",
                                       "give a prepare_data output directory")
  if not 0.0 < _FRACTION.value < 1.0:  # NaN included.
    raise cli.errors.UserError.at(f"bad --fraction {_FRACTION.value}", "--fraction",
                                  "give a share of prompt groups strictly between 0 and 1")
  with cli.user_errors(FileNotFoundError):  # No train shards: not a prepare_data directory.
    arrayrecord.split_paths(os.path.join(_INPUT.value, "train"))
  settings = {"input_dir": os.path.abspath(_INPUT.value), "fraction": _FRACTION.value,
              "group_separator": _SEPARATOR.value, "seed": _SEED.value}
  output_dir.claim(_OUTPUT.value, "carve.json", settings, overwrite=_OVERWRITE.value, flag="--output_dir")
  with cli.user_errors(ValueError):  # A fraction that leaves one side empty.
    counts = validation_split.carve(_INPUT.value, _OUTPUT.value, _FRACTION.value, _SEPARATOR.value, _SEED.value)
  print(f"{_OUTPUT.value}: train {counts['train']} records, eval (validation) {counts['eval']} records")


if __name__ == "__main__":
  cli.run(main)
