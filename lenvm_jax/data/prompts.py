"""Prompts to sample rollouts from (experiments/generate.py) or to predict lengths for (experiments/predict.py
--mode=prompts): a JSONL file, CHAMP, or an existing ArrayRecord split.

Prompt JSONL, one object a line, with exactly one of
  prompt_ids  list[int]: the prompt tokens as the policy sees them (chat template already applied);
  messages    [{"role": "system"|"user"|"assistant", "content": str}, ...]: rendered with the tokenizer's chat
              template and its generation prompt (lenvm_jax/data/tokenizer.py);
  prompt      str: one user message, rendered the same way;
and optionally `prompt_id` (str or int; default: the line number), `split` ("train" | "eval"; default: a hash
of the prompt id, so all samples of a prompt share a split), `generator` (str: whose completion a prediction is
for; rollouts name the policy that samples instead) and `answer` (str or number: the reference answer; rollouts then
score each completion, lenvm_jax/data/answers.py). Errors name file, line and field.

`reasoning_gym:TASK[:N[:SEED[:KEY=VALUE;...]]]` gives N seeded problems of a reasoning-gym task (default 100, seed 0;
the options are the task's config fields, e.g. max_digits=1), each question as one user message through the chat
template, with the task's checker as its answer; a repeated question is kept once. Several specs joined by "+" mix
tasks (e.g. reasoning_gym:chain_sum:100+leg_counting:100).

`champ` gives CHAMP's distinct solution prompts (without a generator tag), split by problem as in
lenvm_jax/data/champ.py; `arrayrecord:PATH` the distinct prompts (by prompt_id, else by tokens) of the trajectories
in the shards at PATH (a file, a glob or <dir>/<split>).
"""

import dataclasses

import numpy as np

from lenvm_jax.data import answers, arrayrecord, champ, jsonl
from lenvm_jax.data.prompt_groups import SPLITS, prompt_key
from lenvm_jax.data.records import RecordError, Trajectory, check_token_ids
from lenvm_jax.data.tokenizer import Tokenizer

PROMPT_FIELDS = ("prompt_ids", "messages", "prompt")
_OPTIONAL_FIELDS = ("prompt_id", "split", "generator", "answer")


@dataclasses.dataclass(frozen=True)
class Prompt:
  prompt_ids: np.ndarray
  prompt_id: str | None  # None only from read_prompt_jsonl(name_by_line=False).
  split: str | None = None  # None: the caller draws one from the prompt id.
  generator: str | None = None
  answer: answers.Answer | None = None  # What a completion is scored against; None: nothing to check.

  def as_trajectory(self) -> Trajectory:
    """The prompt with no completion yet: what prompt-boundary prediction scores."""
    return Trajectory(self.prompt_ids, self.prompt_ids[:0], True, self.prompt_id, self.generator)


def _prompt_from_json(obj, tokenizer: Tokenizer | None, vocab_size: int, path: str, line: int,
                      name_by_line: bool) -> Prompt:
  unknown = sorted(set(obj) - set(PROMPT_FIELDS) - set(_OPTIONAL_FIELDS))
  if unknown:
    raise RecordError(path, line, unknown[0], f"unknown field; a prompt line has one of {PROMPT_FIELDS} and "
                      f"optionally {_OPTIONAL_FIELDS}")
  given = [name for name in PROMPT_FIELDS if name in obj]
  if len(given) != 1:
    raise RecordError(path, line, "<record>", f"needs exactly one of {PROMPT_FIELDS}, got {given or 'none'}")
  field = given[0]
  if field == "prompt_ids":
    ids = obj[field]
  else:
    if tokenizer is None:
      raise RecordError(path, line, field, "text prompts need a tokenizer (--tokenizer); without one a line needs "
                        "prompt_ids, which is missing")
    messages = obj[field] if field == "messages" else [{"role": "user", "content": obj[field]}]
    if field == "prompt" and not isinstance(obj[field], str):
      raise RecordError(path, line, field, f"must be a string, got {obj[field]!r:.40}")
    if field == "messages" and not isinstance(messages, list):
      raise RecordError(path, line, field, "must be a list of {\"role\", \"content\"} messages")
    try:
      ids = tokenizer.prompt_ids(messages)
    except ValueError as e:
      raise RecordError(path, line, field, str(e)) from None
  prompt_ids = check_token_ids(ids, vocab_size, path, line, field)
  prompt_id = obj.get("prompt_id", line if name_by_line else None)
  if prompt_id is not None and (not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool)):
    raise RecordError(path, line, "prompt_id", f"must be a string or integer, got {prompt_id!r:.40}")
  split = obj.get("split")
  if split is not None and split not in SPLITS:
    raise RecordError(path, line, "split", f"must be one of {SPLITS}, got {split!r:.40}")
  generator = obj.get("generator")
  if generator is not None and not isinstance(generator, str):
    raise RecordError(path, line, "generator", f"must be a string, got {generator!r:.40}")
  answer = obj.get("answer")
  if answer is not None and (not isinstance(answer, (str, int, float)) or isinstance(answer, bool)):
    raise RecordError(path, line, "answer", f"must be a string or number, got {answer!r:.40}")
  return Prompt(prompt_ids, None if prompt_id is None else str(prompt_id), split, generator,
                None if answer is None else answers.Answer(str(answer)))


def read_prompt_jsonl(path: str, vocab_size: int, tokenizer: Tokenizer | None = None, *,
                      name_by_line: bool = True) -> list[Prompt]:
  """Every prompt of a prompt JSONL file; anything malformed raises RecordError.

  name_by_line names a prompt without a prompt_id by its line number (rollouts need a name for every prompt);
  without it such a prompt keeps prompt_id None (a prediction echoes what it was given). A (prompt_id, generator)
  pair may occur once.
  """
  prompts, seen = [], {}
  for line, obj in jsonl.json_lines(path):
    if isinstance(obj, RecordError):
      raise obj
    prompt = _prompt_from_json(obj, tokenizer, vocab_size, path, line, name_by_line)
    key = (prompt.prompt_id, prompt.generator)
    if prompt.prompt_id is not None and key in seen:
      raise RecordError(path, line, "prompt_id", f"{prompt.prompt_id!r} repeats line {seen[key]}")
    seen[key] = line
    prompts.append(prompt)
  return prompts


def champ_prompts(tokenizer: Tokenizer, eval_fraction: float, max_problems: int | None = None) -> list[Prompt]:
  """One prompt per CHAMP (problem, prompt setting); the four generators' copies of it are one prompt."""
  prompts = {}
  for record in champ.iter_champ(tokenizer, eval_fraction=eval_fraction, max_problems=max_problems):
    if isinstance(record, RecordError):
      raise record
    trajectory = record.trajectory
    prompts.setdefault(trajectory.prompt_id, Prompt(trajectory.prompt_ids, trajectory.prompt_id, record.split))
  return list(prompts.values())


def arrayrecord_prompts(path: str) -> list[Prompt]:
  """Distinct prompts of existing trajectory shards, in first-seen order; the split is left to the caller."""
  source = arrayrecord.ArrayRecordTrajectories(path)
  prompts = {}
  for index in range(len(source)):
    trajectory = source[index]
    key = prompt_key(trajectory)
    if key not in prompts:
      prompt_id = trajectory.prompt_id if trajectory.prompt_id is not None else f"{path}#{index}"
      prompts[key] = Prompt(trajectory.prompt_ids, prompt_id)
  return list(prompts.values())


def reasoning_gym_prompts(spec: str, tokenizer: Tokenizer) -> list[Prompt]:
  """The problems of `reasoning_gym:TASK[:N[:SEED[:OPTIONS]]]` (several joined by "+"), each question one user
  message; the split is left to the caller (by problem id). A question asked again (small tasks repeat themselves)
  is kept once, under its first id, so that no question lands on both sides of the split."""
  problems = [problem for one in answers.split_reasoning_gym_specs(spec)
              for problem in answers.reasoning_gym_problems(*answers.parse_reasoning_gym_spec(one))]
  ids = [p.problem_id for p in problems]
  if len(set(ids)) < len(ids):
    raise ValueError(f"{spec!r}: the mixed tasks repeat problem ids (give each part of one task its own seed)")
  first_of_question = {}
  for problem in problems:
    first_of_question.setdefault(problem.question, problem)
  distinct = list(first_of_question.values())  # Dicts keep insertion order: the problems' own order.
  return [Prompt(np.asarray(tokenizer.prompt_ids([{"role": "user", "content": p.question}]), np.int32),
                 p.problem_id, answer=p.answer) for p in distinct]


def load_prompts(spec: str, vocab_size: int, tokenizer: Tokenizer | None = None, eval_fraction: float = 0.1
                 ) -> list[Prompt]:
  """`champ`, `reasoning_gym:TASK[:N[:SEED[:OPTIONS]]]` (+ more), `arrayrecord:PATH`, or a prompt JSONL path."""
  if spec in ("champ",) or spec.startswith(answers.REASONING_GYM_PREFIX):
    if tokenizer is None:
      raise ValueError(f"--prompts={spec} needs a tokenizer (--tokenizer)")
  if spec == "champ":
    prompts = champ_prompts(tokenizer, eval_fraction)
  elif spec.startswith(answers.REASONING_GYM_PREFIX):
    prompts = reasoning_gym_prompts(spec, tokenizer)
  elif spec.startswith("arrayrecord:"):
    prompts = arrayrecord_prompts(spec[len("arrayrecord:"):])
  else:
    return read_prompt_jsonl(spec, vocab_size, tokenizer)
  for prompt in prompts:
    check_token_ids(prompt.prompt_ids.tolist(), vocab_size, spec, 0, "prompt_ids")
  return prompts
