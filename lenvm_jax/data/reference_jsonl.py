"""Importers for prepare(): the LenVM reference JSONL (text conversations) and pre-tokenized trajectory JSONL.

Reference layout (docs/method.md §12), one JSON object a line:
  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
   "meta_info": {"lenvm_idx": prompt id, "answer_token_length": int, "finish_reason": "stop"|"length"|{"type": ...},
                 "generator": optional str, sampling parameters ...}}
The last turn must be "gpt": it is the completion; every turn before it is the prompt, rendered with the
tokenizer's chat template (generation prompt added). A finish reason of "length" / "max_tokens" means the generator
hit its token limit: the completion is unfinished and gets no EOS.

Both importers yield ImportedRecord, or a RecordError (never raise) so that prepare's skip mode can go on.
Splits are by prompt, so all completions of one prompt land in the same split (no prompt leaks into eval).
"""

from typing import Callable, Iterator

import numpy as np

from lenvm_jax.data import jsonl
from lenvm_jax.data.prepare import ImportedRecord
from lenvm_jax.data.prompt_groups import check_eval_fraction, hash_split, split_key
from lenvm_jax.data.records import RecordError, Trajectory
from lenvm_jax.data.tokenizer import Tokenizer

ROLE_OF_SPEAKER = {"system": "system", "human": "user", "gpt": "assistant"}
UNFINISHED_REASONS = ("length", "max_tokens")


def _split_function(split_of: Callable[[str], str] | None, eval_fraction: float) -> Callable[[str], str]:
  if split_of is not None:
    return split_of
  check_eval_fraction(eval_fraction)
  return lambda key: hash_split(key, eval_fraction)


def _records(path: str, make_record) -> Iterator[ImportedRecord | RecordError]:
  """make_record(obj, line) for every JSON line of `path`; every failure is yielded as a RecordError, not raised."""
  for line, obj in jsonl.json_lines(path):
    if isinstance(obj, RecordError):
      yield obj
      continue
    try:
      yield make_record(obj, line)
    except RecordError as error:
      yield error


def _finished(meta: dict, source: str, line: int) -> bool:
  reason = meta.get("finish_reason")
  if isinstance(reason, dict):
    reason = reason.get("type")
  if reason is None:
    return True
  if not isinstance(reason, str):
    raise RecordError(source, line, "meta_info.finish_reason",
                      f"must be a string or {{\"type\": string}}, got {meta['finish_reason']!r:.60}")
  return reason not in UNFINISHED_REASONS


def _messages(conversations, source: str, line: int) -> tuple[list[dict], str]:
  """The prompt as chat messages, and the completion text (the last turn, which must be "gpt")."""
  if not isinstance(conversations, list):
    raise RecordError(source, line, "conversations",
                      "is missing" if conversations is None else "must be a list of {\"from\", \"value\"} turns")
  messages = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      raise RecordError(source, line, f"conversations[{i}]", f"must be an object, got {turn!r:.60}")
    if turn.get("from") not in ROLE_OF_SPEAKER:
      raise RecordError(source, line, f"conversations[{i}].from",
                        f"must be one of {sorted(ROLE_OF_SPEAKER)}, got {turn.get('from')!r:.40}")
    if not isinstance(turn.get("value"), str):
      raise RecordError(source, line, f"conversations[{i}].value",
                        "is missing" if "value" not in turn else f"must be a string, got {turn['value']!r:.40}")
    messages.append({"role": ROLE_OF_SPEAKER[turn["from"]], "content": turn["value"]})
  if not any(m["role"] == "assistant" for m in messages):
    raise RecordError(source, line, "conversations", "has no \"gpt\" turn (the completion)")
  if messages[-1]["role"] != "assistant":
    raise RecordError(source, line, "conversations",
                      f"must end with the \"gpt\" completion, ends with {conversations[-1]['from']!r}")
  if not messages[-1]["content"]:
    raise RecordError(source, line, "conversations[-1].value", "the completion text is empty")
  if len(messages) == 1:
    raise RecordError(source, line, "conversations", "has no prompt turns before the \"gpt\" completion")
  return messages[:-1], messages[-1]["content"]


def _reference_record(obj, tokenizer: Tokenizer, generator: str | None, split_of, source: str,
                      line: int) -> ImportedRecord:
  prompt_messages, completion_text = _messages(obj.get("conversations"), source, line)
  meta = obj.get("meta_info", {})
  if not isinstance(meta, dict):
    raise RecordError(source, line, "meta_info", f"must be an object, got {meta!r:.60}")
  finished = _finished(meta, source, line)
  prompt_id = meta.get("lenvm_idx")
  if prompt_id is not None and (not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool)):
    raise RecordError(source, line, "meta_info.lenvm_idx", f"must be a string or integer, got {prompt_id!r:.40}")
  generator = meta.get("generator") or generator
  if generator is not None and not isinstance(generator, str):
    raise RecordError(source, line, "meta_info.generator", f"must be a string, got {generator!r:.40}")
  try:
    prompt_ids = tokenizer.prompt_ids(prompt_messages)
  except ValueError as e:  # The chat template rejected the conversation (e.g. roles do not alternate).
    raise RecordError(source, line, "conversations", str(e)) from None
  completion_ids = tokenizer.completion_ids(completion_text, finished)
  prompt_id = None if prompt_id is None else str(prompt_id)
  trajectory = Trajectory(np.asarray(prompt_ids, np.int32), np.asarray(completion_ids, np.int32), finished,
                          prompt_id, generator)
  split = split_of(split_key(prompt_id, prompt_ids))
  return ImportedRecord(split, trajectory, source, line, text=completion_text, meta=meta)


def iter_reference_jsonl(path: str, tokenizer: Tokenizer, split_of: Callable[[str], str] | None = None, *,
                         eval_fraction: float = 0.1, generator: str | None = None
                         ) -> Iterator[ImportedRecord | RecordError]:
  """Records of one reference JSONL file. split_of(prompt key) -> "train"|"eval"; default: hash_split.

  The prompt key is meta_info.lenvm_idx, else a hash of the prompt tokens. `generator` names the sampling model
  when meta_info has no "generator".
  """
  split_of = _split_function(split_of, eval_fraction)
  return _records(path, lambda obj, line: _reference_record(obj, tokenizer, generator, split_of, path, line))


def iter_tokenized_jsonl(path: str, vocab_size: int, max_len: int, split_of: Callable[[str], str] | None = None,
                         *, eval_fraction: float = 0.1) -> Iterator[ImportedRecord | RecordError]:
  """Records of a pre-tokenized trajectory JSONL (schema in records.py), split by prompt_id like the above."""
  split_of = _split_function(split_of, eval_fraction)

  def record(obj, line):
    trajectory = jsonl.parse_record(obj, vocab_size, max_len, path, line)
    return ImportedRecord(split_of(split_key(trajectory.prompt_id, trajectory.prompt_ids)), trajectory, path, line)

  return _records(path, record)
