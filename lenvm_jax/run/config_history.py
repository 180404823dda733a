"""The configs a run trained with: config.json (the current one) and config.<step>.json (one a resumed run replaced,
which trained the steps up to <step>), so every checkpoint is read with the config that wrote it.

Beside the RunConfig's sections, config.json holds the run's record (`run_record`: its EOS ids and tokenizer,
run/eos.py), which is no config field: a user never sets it, the trainer writes what it found."""

import json
import os

from absl import logging

from lenvm_jax import files
from lenvm_jax.config import RunConfig
from lenvm_jax.errors import UserError

CONFIG_FILE = "config.json"
RECORD_KEY = "run_record"  # config.json's record of what the run found at its start (run/eos.py).


def replaced_config_steps(workdir: str) -> list[int]:
  """Steps k of the config.<k>.json files: configs that trained up to step k, replaced by a resumed run."""
  if not os.path.isdir(workdir):
    return []
  names = (n[len("config."):-len(".json")] for n in os.listdir(workdir)
           if n.startswith("config.") and n.endswith(".json"))
  return sorted(int(n) for n in names if n.isdigit())


def config_path(workdir: str, step: int | None = None) -> str:
  """The config that trained `step` (config.<k>.json of the least replaced k >= step, else config.json)."""
  if step is not None:
    replaced = [k for k in replaced_config_steps(workdir) if k >= step]
    if replaced:
      return os.path.join(workdir, f"config.{replaced[0]}.json")
  return os.path.join(workdir, CONFIG_FILE)


def read_config(workdir: str, step: int | None = None) -> RunConfig:
  """The typed config a run trained `step` with (default: its current config). Older runs' config.json files load
  with defaults for newer fields."""
  path = config_path(workdir, step)
  if not os.path.isfile(path):
    if os.path.isdir(workdir):
      raise UserError.at(f"not a run directory: it has no {CONFIG_FILE}", os.path.abspath(workdir),
                         "give the --workdir of a run that has started training (config.json is written once the "
                         "run has started)")
    raise UserError.at("no such run directory", os.path.abspath(workdir), "check the --workdir path")
  try:
    with open(path, encoding="utf-8") as f:
      return RunConfig.from_dict(_without_record(json.load(f)))
  except ValueError as e:
    if isinstance(e, UserError):
      raise
    raise UserError.at(f"the run's config is not valid JSON ({e})", path, "restore the file from the run") from None


def _without_record(saved):
  return {k: v for k, v in saved.items() if k != RECORD_KEY} if isinstance(saved, dict) else saved


def read_record(workdir: str) -> dict:
  """The run's record in its config.json ({} for a run from before the record, or without a readable config)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
      record = json.load(f).get(RECORD_KEY)
  except (OSError, ValueError, AttributeError):
    return {}
  return record if isinstance(record, dict) else {}


def _same_config(path: str, run: RunConfig) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      return RunConfig.from_dict(_without_record(json.load(f))) == run
  except (OSError, ValueError):
    return False


def write_config(workdir: str, run: RunConfig, resumed_from: int | None = None, record: dict | None = None):
  """config.json := run (+ the run's `record` under RECORD_KEY), atomically. When a resumed run changes the config,
  the one that trained up to its resume step is kept as config.<resumed_from>.json (the first such: a later one
  trained no checkpoint of that step)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if resumed_from is not None and os.path.isfile(path) and not _same_config(path, run):
    kept = os.path.join(workdir, f"config.{resumed_from}.json")
    if os.path.exists(kept):
      os.remove(path)
    else:
      os.replace(path, kept)
      logging.info("the config changed at resume: the one that trained steps up to %d is kept in %s", resumed_from,
                   kept)
  text = run.to_json() if record is None else json.dumps({**run.to_dict(), RECORD_KEY: record}, indent=2,
                                                         sort_keys=True)
  files.write_atomic(path, text)


def differing_fields(saved: RunConfig, run: RunConfig, limit: int = 4) -> list[str]:
  """'model.num_layers: 2 -> 3' for the fields that differ (model fields first), at most `limit`."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  old, new = flat(saved.to_dict()), flat(run.to_dict())
  changed = sorted((k for k in old.keys() | new.keys() if old.get(k) != new.get(k)),
                   key=lambda k: (not k.startswith("model."), k))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:limit]]
