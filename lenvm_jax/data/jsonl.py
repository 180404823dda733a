"""Pre-tokenized trajectory JSONL (schema in lenvm_jax/data/records.py), validated line by line."""

import json
from typing import Iterator

from lenvm_jax.data.records import RecordError, Trajectory, check_token_ids, prompt_too_long

_KNOWN_FIELDS = {"prompt_ids", "completion_ids", "finished", "prompt_id", "generator"}


def parse_record(obj: dict, vocab_size: int, max_len: int, source: str, line: int) -> Trajectory:
  for field in ("prompt_ids", "completion_ids"):
    if field not in obj:
      raise RecordError(source, line, field, "is missing")
  unknown = set(obj) - _KNOWN_FIELDS
  if unknown:
    raise RecordError(source, line, sorted(unknown)[0], f"is not a trajectory field (known: {sorted(_KNOWN_FIELDS)})")
  prompt = check_token_ids(obj["prompt_ids"], vocab_size, source, line, "prompt_ids")
  completion = check_token_ids(obj["completion_ids"], vocab_size, source, line, "completion_ids")
  if problem := prompt_too_long(len(prompt), max_len):
    raise RecordError(source, line, "prompt_ids", problem)
  finished = obj.get("finished", True)
  if not isinstance(finished, bool):
    raise RecordError(source, line, "finished", f"must be true or false, got {finished!r:.40}")
  for field in ("prompt_id", "generator"):
    if obj.get(field) is not None and not isinstance(obj[field], (str, int)):
      raise RecordError(source, line, field, f"must be a string or integer, got {obj[field]!r:.40}")
  prompt_id, generator = obj.get("prompt_id"), obj.get("generator")
  return Trajectory(prompt, completion, finished, None if prompt_id is None else str(prompt_id),
                    None if generator is None else str(generator))  # 3 and "3" name one generator.


def json_lines(path: str) -> Iterator[tuple[int, dict | RecordError]]:
  """(line number, JSON object or RecordError) for every non-blank line; a RecordError if there is none. Every
  record format here is one JSON object a line, so anything else is an error.

  Yields errors instead of raising them, so importers can skip bad lines (prepare_data --on_bad_record=skip).
  """
  found = False
  with open(path, "rb") as f:  # Decoded line by line: a byte that is not UTF-8 is an error of its line.
    for line_number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # A leading byte-order mark is no data.
      except UnicodeDecodeError as e:
        found = True
        yield line_number, RecordError(path, line_number, "<encoding>",
                                       f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8 text "
                                       "(re-encode the file as UTF-8)")
        continue
      if not text.strip():
        continue
      found = True
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        yield line_number, RecordError(path, line_number, "<json>", f"invalid JSON: {e.msg} at column {e.colno}")
        continue
      if not isinstance(obj, dict):
        obj = RecordError(path, line_number, "<record>", f"must be a JSON object, got {type(obj).__name__}")
      yield line_number, obj
  if not found:
    yield 0, RecordError(path, 0, "<file>", "holds no records")


def read_trajectories(path: str, vocab_size: int, max_len: int) -> list[Trajectory]:
  """All records of a JSONL file; blank lines are allowed, anything malformed raises RecordError."""
  records = []
  for line_number, obj in json_lines(path):
    if isinstance(obj, RecordError):
      raise obj
    records.append(parse_record(obj, vocab_size, max_len, path, line_number))
  return records
