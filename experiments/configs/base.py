"""The starting point of every config file: the typed defaults of `lenvm_jax/config.py` as an ml_collections dict.

Other configs start from `get_config(preset)` and change what they need; the fields, their defaults and what they
mean are the dataclasses in lenvm_jax/config.py (and lenvm_jax/model_config.py for the model section), so there is
one list of them. Command-line overrides (`--config.train.steps=500`) work on any field.
"""

from lenvm_jax.config import RunConfig, to_config_dict


def get_config(preset: str = "small"):
  """The defaults with a model preset's shapes (lenvm_jax/model_config.py PRESETS) and a 64-token vocabulary."""
  return to_config_dict(RunConfig.default(preset))
