"""Trajectory records in ArrayRecord shards: the on-disk format that prepare_data writes and training reads.

A record is UTF-8 JSON of the trajectory schema (lenvm_jax/data/records.py) plus optional `text` and `meta`: plain,
inspectable and versionless; decoding is a small fraction of a training step. Shards are written to a temporary name
and renamed when complete, so a shard that exists is whole; a rerun skips shards that exist.

Layout: <dir>/<split>-<index:05d>-of-<count:05d>.array_record, and <dir>/stats.json.
"""

import glob
import json
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lenvm_jax import files
from lenvm_jax.data.records import Trajectory


def encode(trajectory: Trajectory, text: str | None = None, meta: dict | None = None) -> bytes:
  record = {"prompt_ids": trajectory.prompt_ids.tolist(), "completion_ids": trajectory.completion_ids.tolist(),
            "finished": bool(trajectory.finished), "prompt_id": trajectory.prompt_id,
            "generator": trajectory.generator}
  if text is not None:
    record["text"] = text
  if meta:
    record["meta"] = meta
  return json.dumps(record, separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> Trajectory:
  record = json.loads(data)
  return Trajectory(np.asarray(record["prompt_ids"], np.int32), np.asarray(record["completion_ids"], np.int32),
                    record.get("finished", True), record.get("prompt_id"), record.get("generator"))


def shard_path(directory: str, split: str, index: int, count: int) -> str:
  return os.path.join(directory, f"{split}-{index:05d}-of-{count:05d}.array_record")


def write_shard(path: str, records: list[bytes]) -> None:
  """Writes all records to `path` atomically (an exclusive temporary beside it, then rename: files.atomic_path, so
a link planted at the shard's name is replaced, never written through)."""
  with files.atomic_path(path) as tmp:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
      writer.write(record)
    writer.close()


def split_paths(path: str) -> list[str]:
  """The shard files a config path names: a file, a glob, or a `<dir>/<split>` prefix."""
  if os.path.isfile(path):
    return [path]
  found = [p for p in sorted(glob.glob(path)) if os.path.isfile(p)] or sorted(glob.glob(path + "-*-of-*.array_record"))
  if not found:
    hint = ""
    if os.path.isdir(path):  # A prepare_data directory holds one prefix per split.
      splits = sorted({os.path.basename(p).split("-")[0] for p in glob.glob(os.path.join(path, "*-of-*.array_record"))})
      hint = (f"; it is a directory: name a split in it, e.g. {os.path.join(path, splits[0])!r}" if splits
              else "; it is a directory without shards")
    raise FileNotFoundError(f"no ArrayRecord shards at {path!r} (a file, a glob, or <dir>/<split>){hint}")
  return found


class ArrayRecordTrajectories:
  """Random-access Trajectory source over ArrayRecord shards (picklable, for grain worker processes)."""

  def __init__(self, path: str):
    self._open(split_paths(path))

  def _open(self, paths: list[str]):
    self.paths = paths
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Trajectory:
    return decode(self._source[index])

  def __getstate__(self):
    return {"paths": self.paths}

  def __setstate__(self, state):
    self._open(state["paths"])
