"""The trajectory record: one prompt and one sampled completion. Every data source produces these.

Schema (JSONL and, later, ArrayRecord):
  prompt_ids      list[int], non-empty: the prompt as the generator saw it (chat template applied)
  completion_ids  list[int], non-empty: the sampled completion; ends with EOS when `finished`
  finished        bool, default true: false when the generator stopped at its max tokens (no EOS, length unknown)
  prompt_id       optional str/int: groups completions of one prompt (prompt-boundary evaluation)
  generator       optional str: which model sampled the completion
"""

import dataclasses

import numpy as np

from lenvm_jax.errors import UserError


class RecordError(UserError, ValueError):
  """A malformed record, located by source, line (1-based) and field."""

  def __init__(self, source: str, line: int, field: str, problem: str):
    self.source, self.line, self.field = source, line, field
    super().__init__(f"{source}:{line}: field {field!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class Trajectory:
  prompt_ids: np.ndarray
  completion_ids: np.ndarray
  finished: bool = True
  prompt_id: str | None = None
  generator: str | None = None
  # V(s_t) for t = 0..len(completion_ids) when the data source knows it exactly (the synthetic policy).
  exact_values: np.ndarray | None = None


def check_token_ids(ids, vocab_size: int, source: str, line: int, field: str) -> np.ndarray:
  """The ids as int32, or a RecordError naming what is wrong with them."""
  if not isinstance(ids, (list, tuple)) or not ids:
    raise RecordError(source, line, field, f"must be a non-empty list of token ids, got {ids!r:.60}")
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    bad = next(i for i in ids if not isinstance(i, int) or isinstance(i, bool))
    raise RecordError(source, line, field, f"token ids must be integers, found {bad!r:.40}")
  try:
    array = np.asarray(ids, dtype=np.int64)
    out_of_range = (array < 0) | (array >= vocab_size)
  except OverflowError:  # An id beyond int64 (e.g. 2**70): the same check in Python.
    array, out_of_range = None, np.asarray([not 0 <= i < vocab_size for i in ids])
  if out_of_range.any():
    position = int(np.argmax(out_of_range))
    raise RecordError(source, line, field,
                      f"token id {ids[position]} at position {position} is outside the vocabulary "
                      f"[0, {vocab_size}) (model.vocab_size)")
  return array.astype(np.int32)


def prompt_too_long(prompt_length: int, max_len: int) -> str | None:
  """What is wrong with a prompt of prompt_length tokens in rows of max_len, or None: s_0 is the prompt's last token,
  so the prompt must leave room for at least one completion token."""
  if prompt_length < max_len:
    return None
  return (f"prompt has {prompt_length} tokens; max_len ({max_len}) must leave room for the completion "
          "(in training, data.max_prompt_len > 0 keeps only a prompt's last tokens)")
