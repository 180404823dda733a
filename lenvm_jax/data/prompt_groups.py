"""Which prompt a record answers, and which group it counts in: one definition for importers, splits and metrics.

A prompt id may name a problem and a setting, "<problem>|<setting>" (CHAMP's own separator; settings may hold "/"),
so that every setting of a problem can be kept on one side of a split (`problem_of`) and a prompt's setting can be
told apart from the prompt itself (`cell_of`). A record without a prompt id is identified by its prompt tokens.
A prompt-boundary group (docs/method.md §8) is a (prompt, generator) pair: completions of one prompt by one generator.
Train/eval splits are by prompt group too (`split_groups`), so no prompt's completions land on both sides.
"""

import collections
import hashlib

import numpy as np

SPLITS = ("train", "eval")
PROMPT_ID_SEPARATOR = "|"
UNKNOWN_GENERATOR = "unknown"
# Which samples make a prompt-boundary group (boundary_groups): this framework's rule, or the reference's.
BOUNDARY_GROUPINGS = ("finished", "reference")


def make_prompt_id(problem: str, setting: str) -> str:
  """"<problem>|<setting>": the prompt id of one problem asked in one prompt setting."""
  return f"{problem}{PROMPT_ID_SEPARATOR}{setting}"


def problem_of(prompt_id, separator: str = PROMPT_ID_SEPARATOR) -> str:
  """The prompt id up to the first separator (all settings of a problem), or the whole id without a separator."""
  if prompt_id is None:
    raise ValueError("a record has no prompt_id: cannot keep a prompt's completions on one side")
  return prompt_id.split(separator, 1)[0] if separator else prompt_id


def cell_of(group, separator: str = PROMPT_ID_SEPARATOR) -> tuple[str, str]:
  """(generator, what follows the separator in the prompt id) of a group key: e.g. CHAMP's prompt setting; "" when
  the prompt id has no separator or the prompt is known by its tokens only."""
  prompt, generator = group
  has_cell = separator and isinstance(prompt, str) and separator in prompt
  return generator, (prompt.split(separator, 1)[1] if has_cell else "")


def generator_of(trajectory) -> str:
  """The generator's name; records that do not say count under UNKNOWN_GENERATOR."""
  return trajectory.generator or UNKNOWN_GENERATOR


def prompt_key(trajectory):
  """The prompt a record answers: its prompt id, else its prompt tokens (as a tuple, so equal prompts match)."""
  return trajectory.prompt_id if trajectory.prompt_id is not None else tuple(trajectory.prompt_ids.tolist())


def group_key(trajectory) -> tuple:
  """(prompt, generator): the prompt-boundary group of a record."""
  return prompt_key(trajectory), generator_of(trajectory)


def add_to_groups(groups: collections.defaultdict, trajectory) -> None:
  """Adds a finished trajectory's completion length to its group (unfinished ones have no known length)."""
  if trajectory.finished:
    groups[group_key(trajectory)].append(len(trajectory.completion_ids))


def group_by_prompt(trajectories) -> dict:
  """{(prompt id or prompt tokens, generator): [completion lengths]} of the finished trajectories."""
  groups = collections.defaultdict(list)
  for trajectory in trajectories:
    add_to_groups(groups, trajectory)
  return dict(groups)


def boundary_groups(trajectories, grouping: str = "finished", samples_per_prompt: int = 0) -> dict:
  """{(prompt, generator): [completion lengths]} that the prompt-boundary MRE is measured on (docs/method.md §8).

  "finished" (the default): the finished completions of each group, however many; an unfinished completion has no
  known length, so it is left out (a group of long prompts then looks shorter than it is). "reference" (the
  reference's evaluation): every sample counts, an unfinished one with its token count, and only groups with
  exactly `samples_per_prompt` samples are kept (0 = the most common group size), so every L_GT averages the same
  number of samples.
  """
  if grouping not in BOUNDARY_GROUPINGS:
    raise ValueError(f"prompt-boundary grouping must be one of {BOUNDARY_GROUPINGS}, got {grouping!r}")
  if grouping == "finished":
    return group_by_prompt(trajectories)
  groups = collections.defaultdict(list)
  for trajectory in trajectories:
    groups[group_key(trajectory)].append(len(trajectory.completion_ids))
  if not groups:
    return {}
  sizes = collections.Counter(len(v) for v in groups.values())
  wanted = samples_per_prompt or max(sizes, key=lambda size: (sizes[size], size))
  return {key: lengths for key, lengths in groups.items() if len(lengths) == wanted}


def split_key(prompt_id, prompt_ids) -> str:
  """What a record's split is drawn from: its prompt id, else a hash of its prompt tokens (equal prompts agree)."""
  if prompt_id is not None:
    return str(prompt_id)
  return "prompt-sha256:" + hashlib.sha256(np.asarray(prompt_ids, np.int64).tobytes()).hexdigest()


def check_eval_fraction(eval_fraction: float) -> None:
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")


def hash_split(key: str, eval_fraction: float) -> str:
  """"eval" for a stable `eval_fraction` share of keys; sha256, not hash(), so every run and host agrees. Needs no
  list of all groups, so a streamed import can split record by record."""
  draw = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
  return "eval" if draw < eval_fraction else "train"


def split_groups(group_ids, eval_fraction: float, seed: int | None = None) -> dict[str, str]:
  """group id -> "train"|"eval", so every record of a group lands on one side.

  With a seed: sorted ids, a seeded permutation, the first round(eval_fraction * n) are eval: an exact share (CHAMP
  problems, carved validation groups). Without: each id by hash_split, which does not depend on the other ids.
  """
  check_eval_fraction(eval_fraction)
  if seed is None:
    return {group: hash_split(group, eval_fraction) for group in group_ids}
  ordered = sorted(group_ids)
  permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
  eval_count = round(eval_fraction * len(ordered))
  return {group: "eval" if rank < eval_count else "train" for rank, group in enumerate(permuted)}
