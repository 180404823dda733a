"""The starting point of every config file: the typed defaults of `lenvm_jax/config.py` as an ml_collections dict.

Other configs start from `get_config(preset)` and change what they need; the fields, their defaults and what they
mean are the dataclasses in lenvm_jax/config.py (and lenvm_jax/model_config.py for the model section), so there is
one list of them. Command-line overrides (`--config.train.steps=500`) work on any field.
"""

import os

from lenvm_jax.config import RunConfig, to_config_dict


def get_config(preset: str = "small"):
  """The defaults with a model preset's shapes (lenvm_jax/model_config.py PRESETS) and a 64-token vocabulary."""
  return to_config_dict(RunConfig.default(preset))


def set_data_dir(config, arg: str | None, default: str):
  """A job's data from one place: `--config <file>:data_dir=DIR` (what a copied job changes) sets data.train_path and
  data.eval_path to DIR/train and DIR/eval (the splits prepare_data and generate write); no argument keeps the job's
  own `default`. --config.data.train_path / eval_path still override each."""
  data_dir = default
  if arg:
    key, sep, value = arg.partition("=")
    if key.strip() != "data_dir" or not sep or not value.strip():
      raise ValueError(f"the config argument must be data_dir=DIR (the directory holding train/ and eval/), "
                       f"got {arg!r}")
    data_dir = value.strip()
  config.data.train_path = os.path.join(data_dir, "train")
  config.data.eval_path = os.path.join(data_dir, "eval")
  return config
