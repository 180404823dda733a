"""What are this run's EOS ids (and its tokenizer): the one answer every tool reads.

The trainer records them in config.json (`run_record`, config_history.py) once the run has started: the ids the LenVM
was trained to value 0 are the last tokens of the finished completions of its training data (a finished completion
ends with EOS by definition, data/records.py), the synthetic policy's own id for synthetic data, else data.eos_id; the
tokenizer is the one its data was imported with (prepare_data's import.json, generate's generation.json), when known.

A run from before the record derives them as the tools always did (`run_eos_ids`): the synthetic policy's id, else
the finished completions of the data a tool passes.
"""

import json
import os
from typing import Callable, Iterable

from lenvm_jax.config import RunConfig
from lenvm_jax.data.synthetic import EOS_ID as SYNTHETIC_EOS_ID
from lenvm_jax.run import config_history

# Training records read for the ids at train time: enough to meet every EOS of a generator (rarely more than two).
RECORDS_READ = 1024
# The marker files of an import into a data directory that name its tokenizer (data/output_dir.py).
_IMPORT_MARKERS = ("import.json", "generation.json")


def eos_ids_of_data(trajectories: Iterable) -> tuple[int, ...]:
  """The distinct last tokens of the finished completions, sorted (empty when none finished)."""
  return tuple(sorted({int(t.completion_ids[-1]) for t in trajectories if t.finished and len(t.completion_ids)}))


def data_tokenizer(run: RunConfig) -> str | None:
  """The tokenizer the run's training data was imported with (its import marker's `tokenizer`), or None."""
  path = run.data.train_path
  if run.data.source != "arrayrecord" or not path:
    return None
  for directory in dict.fromkeys((path, os.path.dirname(path), os.path.dirname(os.path.dirname(path)))):
    for marker in _IMPORT_MARKERS:
      try:
        with open(os.path.join(directory, marker), encoding="utf-8") as f:
          tokenizer = json.load(f).get("tokenizer")
      except (OSError, ValueError, AttributeError):
        continue
      if isinstance(tokenizer, str) and tokenizer:
        return tokenizer
  return None


def record(run: RunConfig, train_source) -> dict:
  """config.json's `run_record` of a run about to train on `train_source`: its EOS ids (where they came from) and
  its tokenizer."""
  if run.data.source == "synthetic":
    return {"eos_ids": [SYNTHETIC_EOS_ID], "eos_source": "the synthetic policy", "tokenizer": None}
  found = eos_ids_of_data(train_source[i] for i in range(min(RECORDS_READ, len(train_source))))
  if found:
    source = "the training data's finished completions"
  elif run.data.eos_id >= 0:
    found, source = (run.data.eos_id,), "data.eos_id"
  else:
    source = "none: the training data has no finished completion"
  return {"eos_ids": list(found), "eos_source": source, "tokenizer": data_tokenizer(run)}


def recorded(workdir: str) -> dict:
  """The run's record ({} for a run from before it)."""
  return config_history.read_record(workdir)


def run_eos_ids(workdir: str, trajectories: Iterable | Callable[[], Iterable] = ()) -> tuple[int, ...]:
  """This run's EOS ids: the record in its config.json; for a run from before the record, the synthetic policy's id
  for synthetic data, else the last tokens of the finished completions among `trajectories` (or what calling it
  returns: the data is read only when needed). Empty when none of these names any."""
  ids = recorded(workdir).get("eos_ids")
  if ids:
    return tuple(int(i) for i in ids)
  if config_history.read_config(workdir).data.source == "synthetic":
    return (SYNTHETIC_EOS_ID,)
  return eos_ids_of_data(trajectories() if callable(trajectories) else trajectories)


def run_tokenizer(workdir: str) -> str | None:
  """The tokenizer the run's data was imported with, from its record (None when unknown)."""
  return recorded(workdir).get("tokenizer")
