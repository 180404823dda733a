"""Imported trajectories -> validated ArrayRecord shards per split + stats.json (what prepare_data runs).

Importers (reference JSONL, pre-tokenized JSONL, CHAMP) yield ImportedRecord, or a RecordError for a record they
could not parse. Every trajectory is then checked here the same way. A bad record stops the import with an error
naming file, line and field, or, under on_bad_record="skip", is skipped, printed and counted in stats.json.
"""

import collections
import dataclasses
import os
from typing import Iterable

from absl import logging

from lenvm_jax.data import arrayrecord, stats
from lenvm_jax.data.prompt_groups import SPLITS
from lenvm_jax.data.records import RecordError, Trajectory, check_token_ids, prompt_too_long

BAD_RECORD_POLICIES = ("error", "skip")
FILE_FIELD = "<file>"  # RecordError.field of an error about a whole input file.


@dataclasses.dataclass(frozen=True)
class ImportedRecord:
  split: str  # "train" or "eval"
  trajectory: Trajectory
  source: str  # File (or dataset) the record came from, and its 1-based line / index: for error messages.
  line: int
  text: str | None = None
  meta: dict | None = None


def validate(record: ImportedRecord, vocab_size: int, max_len: int) -> None:
  t, src, line = record.trajectory, record.source, record.line
  if record.split not in SPLITS:
    raise RecordError(src, line, "split", f"must be one of {SPLITS}, got {record.split!r}")
  check_token_ids(t.prompt_ids.tolist(), vocab_size, src, line, "prompt_ids")
  check_token_ids(t.completion_ids.tolist(), vocab_size, src, line, "completion_ids")
  if problem := prompt_too_long(len(t.prompt_ids), max_len):
    raise RecordError(src, line, "prompt_ids", problem)


def prepare(records: Iterable[ImportedRecord | RecordError], output_dir: str, *, vocab_size: int, max_len: int,
            shard_size: int = 4096, on_bad_record: str = "error", log_every: int = 2000) -> dict:
  """Writes <output_dir>/<split>-*.array_record and stats.json; returns the stats. Existing shards are kept."""
  if on_bad_record not in BAD_RECORD_POLICIES:
    raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
  os.makedirs(output_dir, exist_ok=True)
  encoded = {split: [] for split in SPLITS}
  kept = {split: [] for split in SPLITS}
  skipped = collections.Counter()
  seen = 0
  for item in records:
    seen += 1
    try:
      if isinstance(item, RecordError):
        raise item
      validate(item, vocab_size, max_len)
    except RecordError as error:
      if on_bad_record == "error" or error.field == FILE_FIELD:  # A whole file (empty, unreadable) is no record.
        raise
      skipped[error.field] += 1
      logging.warning("skipped bad record (on_bad_record=skip): %s", error)
      continue
    trajectory = item.trajectory
    if trajectory.generator is not None and not isinstance(trajectory.generator, str):  # 3 and "3": one generator.
      trajectory = dataclasses.replace(trajectory, generator=str(trajectory.generator))
    encoded[item.split].append(arrayrecord.encode(trajectory, item.text, item.meta))
    kept[item.split].append(trajectory)
    if seen % log_every == 0:
      logging.info("imported %d records (%d skipped)", seen, sum(skipped.values()))

  written = {}
  for split in SPLITS:
    chunks = [encoded[split][i:i + shard_size] for i in range(0, len(encoded[split]), shard_size)]
    for index, chunk in enumerate(chunks):
      path = arrayrecord.shard_path(output_dir, split, index, len(chunks))
      if not os.path.exists(path):  # A rerun keeps the shards an earlier run finished.
        arrayrecord.write_shard(path, chunk)
    written[split] = len(chunks)

  result = stats.write_stats(output_dir, kept, written, skipped)
  logging.info("wrote %s: %s records, %d skipped", output_dir, result["records"], result["skipped"]["total"])
  return result
