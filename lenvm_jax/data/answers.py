"""Checkable answers: prompts whose completions can be scored right or wrong (rollouts' `correct`, guided decoding's
accuracy), and reasoning-gym's seeded problems as such prompts.

A completion's final answer is the content of its last `<answer>...</answer>` tag (reasoning-gym's convention), else
its last number (GSM8K's: a chain of thought states the result last; thousands commas dropped). A reasoning-gym
prompt is then scored by the task's own checker (`dataset.score_answer` on that final answer; correct = a score of
1); a prompt JSONL `answer` by exact match, numerically when both sides are numbers.
"""

import ast
import dataclasses
import re
from typing import Callable

_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
REASONING_GYM_PREFIX = "reasoning_gym:"


def final_answer(completion: str) -> str | None:
  """The last `<answer>` tag's content, else the last number in the completion, else None."""
  tags = _ANSWER_TAG.findall(completion)
  if tags:
    return tags[-1].strip()
  numbers = _NUMBER.findall(completion)
  return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _as_number(text: str) -> float | None:
  try:
    return float(text.replace(",", "").strip())
  except ValueError:
    return None


def matches(given: str | None, answer: str) -> bool:
  """Exact match after stripping, numerically when both sides parse as numbers ("288.0" == "288")."""
  if given is None:
    return False
  given_number, answer_number = _as_number(given), _as_number(answer)
  if given_number is not None and answer_number is not None:
    return given_number == answer_number
  return given.strip() == answer.strip()


@dataclasses.dataclass(frozen=True)
class Answer:
  """What a completion is scored against: the reference answer and the check (completion text -> correct)."""
  answer: str
  check: Callable[[str], bool] = dataclasses.field(compare=False, repr=False, default=None)

  def __post_init__(self):
    if self.check is None:
      object.__setattr__(self, "check", lambda completion: matches(final_answer(completion), self.answer))

  def is_correct(self, completion: str) -> bool:
    return bool(self.check(completion))


@dataclasses.dataclass(frozen=True)
class GymProblem:
  problem_id: str  # "<task>/<seed>/<index>": unique across specs, so the train/eval split follows the problem.
  question: str
  answer: Answer


def _option_value(text: str):
  """A task option's value: a Python literal (int, float, bool, tuple, ...) when it parses as one, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_reasoning_gym_spec(spec: str, default_count: int = 100) -> tuple[str, int, int, dict]:
  """`reasoning_gym:TASK[:N[:SEED[:KEY=VALUE;KEY=VALUE...]]]` -> (task, N, seed, options); N defaults to 100, the
  seed to 0. The options are the task's own config fields (e.g. chain_sum's max_digits=2), values Python literals."""
  parts = spec[len(REASONING_GYM_PREFIX):].split(":", 3)
  if not parts[0]:
    raise ValueError(f"{spec!r}: expected reasoning_gym:TASK[:N[:SEED[:KEY=VALUE;...]]], "
                     "e.g. reasoning_gym:gsm_symbolic:200")
  try:
    count = int(parts[1]) if len(parts) > 1 else default_count
    seed = int(parts[2]) if len(parts) > 2 else 0
  except ValueError:
    raise ValueError(f"{spec!r}: N and SEED must be integers") from None
  if count <= 0:
    raise ValueError(f"{spec!r}: N must be positive, got {count}")
  options = {}
  for item in (parts[3].split(";") if len(parts) > 3 and parts[3] else []):
    key, equals, value = item.partition("=")
    if not equals or not key.strip().isidentifier():
      raise ValueError(f"{spec!r}: task option {item!r} is not KEY=VALUE")
    options[key.strip()] = _option_value(value.strip())
  return parts[0], count, seed, options


def split_reasoning_gym_specs(spec: str) -> list[str]:
  """`reasoning_gym:A...+B...+...` (a mix of tasks; the prefix may be left off after the first) -> one spec each."""
  return [part if part.startswith(REASONING_GYM_PREFIX) else REASONING_GYM_PREFIX + part
          for part in spec.split("+")]


def reasoning_gym_problems(task: str, count: int, seed: int, options: dict | None = None) -> list[GymProblem]:
  """`count` seeded problems of a reasoning-gym task built with its config `options` (problem i is the same for any
  count), each checked by the task's scorer on the completion's final answer. Problem ids name the options, so two
  settings of one task never share an id."""
  try:
    import reasoning_gym  # Imported here: only this prompt source needs it.
  except ImportError as e:
    raise ValueError(f"reasoning_gym:{task} needs the reasoning-gym package (requirements.txt): {e}") from None
  try:
    dataset = reasoning_gym.create_dataset(task, size=count, seed=seed, **(options or {}))
  except Exception as e:  # The registry raises bare errors for an unknown task name or option.
    raise ValueError(f"reasoning_gym: cannot create task {task!r} with options {options or {}}: {e}") from None
  name = task + ("{" + ";".join(f"{k}={v!r}" for k, v in sorted(options.items())) + "}" if options else "")
  problems = []
  for index in range(count):
    entry = dataset[index]

    def check(completion: str, entry=entry) -> bool:
      return dataset.score_answer(answer=final_answer(completion), entry=entry) == 1.0

    problems.append(GymProblem(f"{name}/{seed}/{index}", entry["question"], Answer(str(entry["answer"]), check)))
  return problems
