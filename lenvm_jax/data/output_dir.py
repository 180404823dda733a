"""One import per output directory: prepare_data and generate write shards + stats.json that describe one import.

`claim` records the import's settings in a marker file (prepare_data: import.json, generate: generation.json,
carve_validation: carve.json) before
any shard is written. A rerun with the same settings resumes (finished shards are kept); other settings, or data
files without a marker (an older or another tool's import), are refused, so shards of two imports never mix under
one stats.json. `overwrite=True` removes the previous import's data files first (only those).
"""

import fnmatch
import json
import os

from lenvm_jax import files
from lenvm_jax.errors import UserError

# What an import writes (arrayrecord shards, their temporaries, stats, markers) and data_stats adds beside it.
DATA_FILES = ("*.array_record", "*.array_record.tmp", ".*.array_record.*.tmp", "stats.json", "import.json",
              "generation.json", "carve.json", "data_stats.json", "lengths.png")


class OutputDirError(UserError, ValueError):
  """The output directory is a file or holds another import."""


def data_files(directory: str) -> list[str]:
  """Names of the import files in `directory` (none when it does not exist)."""
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory) if any(fnmatch.fnmatch(name, p) for p in DATA_FILES))


def _normalized(settings: dict) -> dict:
  return json.loads(json.dumps(settings))  # Tuples -> lists, as they are stored.


def claim(directory: str, marker: str, settings: dict, *, overwrite: bool = False, flag: str = "--output_dir"
          ) -> None:
  """Makes `directory` this import's: creates it and writes <directory>/<marker> = settings; raises OutputDirError
  if it is a file or holds another import (unless `overwrite`, which removes that import's files)."""
  where = f"{flag}={directory}"
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise OutputDirError.at("the output directory is a file", where, "choose a directory path")
  settings = _normalized(settings)
  existing = data_files(directory)
  path = os.path.join(directory, marker)
  if set(existing) - {marker}:  # A marker alone (an import that failed before its first shard) protects nothing.
    previous = None
    if marker in existing:
      try:
        with open(path, encoding="utf-8") as f:
          previous = json.load(f)
      except (OSError, ValueError):
        previous = None
    if previous == settings:
      return  # A rerun of the same import: it resumes.
    if not overwrite:
      if isinstance(previous, dict):
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        what = "holds an import made with other settings (" + "; ".join(
            f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed) + ")"
      else:
        what = f"holds another import ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''})"
      raise OutputDirError.at(f"the output directory {what}", where,
                              "choose a new directory, or pass --overwrite to replace that import")
    for name in existing:
      os.remove(os.path.join(directory, name))
  os.makedirs(directory, exist_ok=True)
  files.write_atomic(path, json.dumps(settings, indent=2, sort_keys=True))  # A planted symlink is not followed.


def refuse_same_directory(input_dir: str, output_dir: str, input_flag: str, output_flag: str,
                          emptied: bool = False) -> None:
  """An output directory that is the input one (or lies inside it) would rewrite the input in place; one that holds
  the input would delete it when `emptied` (an --overwrite that removes all of the output's contents)."""
  real_in, real_out = os.path.realpath(input_dir), os.path.realpath(output_dir)
  if real_in == real_out or real_out.startswith(real_in + os.sep):
    raise OutputDirError.at("the output directory is the input directory or inside it",
                            f"{output_flag}={output_dir}, {input_flag}={input_dir}",
                            "choose an output directory outside the input")
  if emptied and real_in.startswith(real_out + os.sep):
    raise OutputDirError.at("the output directory holds the input: --overwrite would delete it",
                            f"{output_flag}={output_dir}, {input_flag}={input_dir}",
                            "choose an output directory that does not contain the input")
