"""Trajectory -> one fixed-length training row (the batch format the model, targets and metrics consume).

Row fields, each [max_len]:
  tokens             int32  prompt + completion, cut at max_len, then padding (0)
  positions          int32  position within its own sequence (RoPE)
  segment_ids        int32  1.. per packed sequence, 0 = padding (attention never crosses segments)
  value_mask         bool   regression positions: the prompt's last token through EOS (docs/method.md §4)
  remaining          int32  n_t = L - t from the *untruncated* completion; -1 = unknown (unfinished, kept infinite)
  completion_index   int32  t at value positions (0 at the prompt's last token), -1 elsewhere
  completion_length  int32  L of the sequence at value positions (per-position metrics), 0 elsewhere
  lm_targets         int32  next token at each position
  lm_mask            bool   positions whose next token is a completion token
  exact_value        float32 (synthetic data only) the exact V(s_t)
  censored           bool   (data.unfinished='censored' only) value positions of a cut completion: `remaining` there is
                            a lower bound (the tokens left in the kept completion plus the one at least that followed)
`trajectory_to_row` returns the unpadded arrays (length <= max_len); `pad_row` pads them, and packing
(lenvm_jax/data/pipeline.py) instead concatenates several into one row, renumbering segment_ids and positions.
The objective and metrics (lenvm_jax/value/) read the fields by the names below.
"""

import numpy as np

from lenvm_jax.data.records import Trajectory, prompt_too_long

UNFINISHED_POLICIES = ("drop", "infinite", "as_finished", "append_eos", "censored")
PROMPT_CUTS = ("tail", "head", "refuse")
TOKENS, POSITIONS, SEGMENT_IDS = "tokens", "positions", "segment_ids"
VALUE_MASK, REMAINING = "value_mask", "remaining"
COMPLETION_INDEX, COMPLETION_LENGTH = "completion_index", "completion_length"
LM_TARGETS, LM_MASK = "lm_targets", "lm_mask"
EXACT_VALUE = "exact_value"
CENSORED = "censored"
# Per-token fields a packer concatenates (positions and segment_ids it renumbers itself).
PACKED_FIELDS = (TOKENS, VALUE_MASK, REMAINING, COMPLETION_INDEX, COMPLETION_LENGTH, LM_TARGETS, LM_MASK)


def cut_prompt(prompt: np.ndarray, max_prompt_len: int, prompt_cut: str = "tail") -> np.ndarray:
  """A prompt longer than max_prompt_len (> 0) under data.prompt_cut: "tail" keeps its last tokens (the most recent
  context, next to s_0), "head" its first ones (the reference's truncation; s_0 is then a token inside the prompt);
  "refuse" is checked before training (data/cut_report.py), so a long prompt reaching here is an error."""
  if not max_prompt_len or len(prompt) <= max_prompt_len:
    return prompt
  if prompt_cut == "tail":
    return prompt[-max_prompt_len:]
  if prompt_cut == "head":
    return prompt[:max_prompt_len]
  raise ValueError(f"prompt has {len(prompt)} tokens, more than data.max_prompt_len={max_prompt_len} "
                   "(data.prompt_cut='refuse')")


def trajectory_to_row(trajectory: Trajectory, max_len: int, unfinished: str = "drop",
                      max_prompt_len: int = 0, eos_id: int = -1, prompt_cut: str = "tail") -> dict[str, np.ndarray]:
  """One sequence's row fields, cut at max_len but not padded.

  max_prompt_len > 0 cuts a longer prompt to max_prompt_len tokens by the prompt_cut rule (cut_prompt; default: its
  last tokens); 0 makes a prompt that leaves no room for the completion an error.
  An unfinished completion (no EOS) under "infinite" gets remaining -1; under "as_finished" it is taken to end at its
  last generated token (n = 0 there); under "append_eos" eos_id is appended first, as the reference's chat template
  ends every answer with its EOS, so the last generated token gets n = 1 and the appended EOS n = 0 (its exact
  value, on synthetic data, is 0: EOS is terminal). Under "censored" it is kept as cut: at least one more token
  followed its last one, so remaining there is the lower bound L - t + 1, and the row's `censored` field marks it
  (the objective takes a one-sided loss there, value/objective.py); finished completions get an all-false field.
  """
  prompt, completion = trajectory.prompt_ids, trajectory.completion_ids
  exact_values = trajectory.exact_values
  if unfinished == "append_eos" and not trajectory.finished:
    if eos_id < 0:
      raise ValueError("data.unfinished='append_eos' needs data.eos_id, the EOS token it appends")
    completion = np.append(completion, eos_id).astype(completion.dtype)
    if exact_values is not None:
      exact_values = np.append(exact_values, 0.0)
  prompt = cut_prompt(prompt, max_prompt_len, prompt_cut)
  p, length = len(prompt), len(completion)
  if problem := prompt_too_long(p, max_len):
    raise ValueError(problem)
  tokens = np.concatenate([prompt, completion])[:max_len].astype(np.int32)
  n = len(tokens)

  t = np.arange(n) - (p - 1)  # completion index; 0 at the prompt's last token
  value = t >= 0
  infinite = not trajectory.finished and unfinished == "infinite"
  censored = not trajectory.finished and unfinished == "censored"
  remaining = np.where(value, -1 if infinite else length - t + censored, 0)
  lm_mask = value & (np.arange(n) + 1 < n)

  row = {
      TOKENS: tokens,
      POSITIONS: np.arange(n, dtype=np.int32),
      SEGMENT_IDS: np.ones(n, np.int32),
      VALUE_MASK: value,
      REMAINING: remaining.astype(np.int32),
      COMPLETION_INDEX: np.where(value, t, -1).astype(np.int32),
      COMPLETION_LENGTH: np.where(value, length, 0).astype(np.int32),
      LM_TARGETS: np.append(tokens[1:], 0).astype(np.int32),
      LM_MASK: lm_mask,
  }
  if unfinished == "censored":
    row[CENSORED] = value & censored
  if exact_values is not None:
    row[EXACT_VALUE] = np.where(value, exact_values[np.clip(t, 0, length)], 0.0).astype(np.float32)
  return row


def pad_row(row: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
  return {k: np.pad(v, (0, max_len - len(v))) for k, v in row.items()}
