"""Importer for CHAMP (pip package champ-dataset): 270 competition math problems, each answered by 4 models
(GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium) under 18 prompt settings: 19,440 real generator transcripts.

Every CHAMP conversation ends the same way (champ_dataset/prompt.py, `prompt_summarizer`):
  System, User(s) [, Model / Imputation turns], Model: the solution, User: "Now, summarize the answer above in one
  sentence, ...", Model: the one-sentence summary.
The trajectory whose length matters is the solution, so by default (turn="solution") the completion is the model
turn before that summarize request, and the prompt is every turn before the solution. turn="summary" takes the final
model turn (the summary) instead, with all earlier turns, the solution included, as the prompt.

Length limits (Message.error): LENGTH_CURRENT marks a turn the model stopped at its token limit: an unfinished
completion (no EOS). LENGTH_PREVIOUS marks a turn that was never generated (text None) because the turn before it
hit the limit; in CHAMP it only occurs on the final summary, after a LENGTH_CURRENT solution. So with turn="summary"
those conversations have no completion and are yielded as RecordError; with turn="solution" they are ordinary
unfinished records.
Caveat: CHAMP flags no PaLM 2 Medium turn, yet most of its solutions of >= ~950 (Mistral) tokens stop mid-sentence
(its output limit, unrecorded), so those ~500 records are marked finished although they were cut.

Roles: System -> system, User -> user, Model.<name> and Imputation (the few-shot answers CHAMP wrote into the
5-Shot prompts) -> assistant. Token counts are of the given tokenizer (by default Mistral's 32k SentencePiece
model, as a stand-in: the CHAMP generators' own tokenizers are not public), not of the generators.

Records: prompt_id "<problem id>|<setting>" (CHAMP's own "|" separator; settings contain "/"), so the 4 generators'
answers to one prompt share a group; meta {"problem_id", "setting", "generator"}; the split is by problem, so no
eval problem is seen in training under any setting or generator.
"""

import importlib.resources
from typing import Iterator

import numpy as np

from lenvm_jax.data.prepare import ImportedRecord
from lenvm_jax.data.prompt_groups import make_prompt_id, split_groups
from lenvm_jax.data.records import RecordError, Trajectory
from lenvm_jax.data.tokenizer import Tokenizer

TURNS = ("solution", "summary")
LENGTH_CURRENT, LENGTH_PREVIOUS = "LENGTH_CURRENT", "LENGTH_PREVIOUS"
_MODEL_PREFIX = "Model."
_ROLE_OF_CHAMP_ROLE = {"System": "system", "User": "user", "Imputation": "assistant"}


def default_tokenizer_path() -> str:
  """Mistral's v1 SentencePiece model (32,000 pieces) shipped inside mistral-common: needs no download."""
  path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
  if not path.is_file():
    raise FileNotFoundError(f"mistral-common has no tokenizer at {path}; pass a tokenizer explicitly")
  return str(path)


def _role(champ_role) -> str | None:
  if isinstance(champ_role, str) and champ_role.startswith(_MODEL_PREFIX):
    return "assistant"
  return _ROLE_OF_CHAMP_ROLE.get(champ_role)


def _completion_index(messages, turn: str, summarize_request: str) -> int:
  """Index of the completion turn: the final message, or for "solution" the one before the summarize request."""
  last = len(messages) - 1
  if turn == "summary":
    return last
  ends_with_summary = (last >= 2 and messages[last - 1].role == "User"
                       and messages[last - 1].text == summarize_request)
  return last - 2 if ends_with_summary else last


def _record(problem_id: str, key: str, conversation, turn: str, summarize_request: str, split: str,
            tokenizer: Tokenizer, prompt_cache: dict, source: str, line: int,
            tag_generator: bool = False) -> ImportedRecord:
  where = f"conversations[{problem_id}][{key}]"
  generator, separator, setting = key.partition("|")
  if not separator or not generator or not setting:
    raise RecordError(source, line, where, "the key must be \"<model>|<prompt setting>\"")
  messages = conversation.messages or []
  if not messages:
    raise RecordError(source, line, where, "has no messages")
  index = _completion_index(messages, turn, summarize_request)
  response = messages[index]
  field = f"{where}.messages[{index}]"
  if not isinstance(response.role, str) or not response.role.startswith(_MODEL_PREFIX):
    raise RecordError(source, line, f"{field}.role", f"the {turn} must be a model turn, got {response.role!r:.40}")
  if response.text is None:
    raise RecordError(source, line, f"{field}.text",
                      f"no {turn} was generated (error {response.error}: the turn before it hit the length limit)")
  if not response.text:
    raise RecordError(source, line, f"{field}.text", f"the {turn} text is empty")
  if index == 0:
    raise RecordError(source, line, where, f"has no prompt turns before the {turn}")
  prompt = []
  for i, message in enumerate(messages[:index]):
    role = _role(message.role)
    if role is None:
      raise RecordError(source, line, f"{where}.messages[{i}].role", f"unknown role {message.role!r:.40}")
    if not isinstance(message.text, str):
      raise RecordError(source, line, f"{where}.messages[{i}].text", f"must be a string, got {message.text!r:.40}")
    prompt.append((role, message.text))
  if tag_generator:  # One LenVM for four generators: the state must say whose continuation it predicts. The tag ends
    # the last prompt turn, so it survives a left-cut prompt (data.max_prompt_len).
    role, text = prompt[-1]
    prompt[-1] = (role, f"{text}\n\n(The answer is written by {generator}.)")
  prompt = tuple(prompt)
  if prompt not in prompt_cache:  # Most prompts are shared by all 4 generators: encode each once.
    try:
      prompt_cache[prompt] = np.asarray(tokenizer.prompt_ids([{"role": r, "content": c} for r, c in prompt]),
                                        np.int32)
    except ValueError as e:  # The chat template rejected the conversation.
      raise RecordError(source, line, where, str(e)) from None
  finished = response.error != LENGTH_CURRENT
  completion_ids = np.asarray(tokenizer.completion_ids(response.text, finished), np.int32)
  trajectory = Trajectory(prompt_cache[prompt], completion_ids, finished, make_prompt_id(problem_id, setting),
                          generator)
  meta = {"problem_id": problem_id, "setting": setting, "generator": generator}
  return ImportedRecord(split, trajectory, source, line, text=response.text, meta=meta)


def iter_champ(tokenizer: Tokenizer, eval_fraction: float = 0.2, seed: int = 0, max_problems: int | None = None,
               *, version: str = "v0", turn: str = "solution",
               tag_generator: bool = False) -> Iterator[ImportedRecord | RecordError]:
  """One record (or RecordError, never raised) per conversation; line = 1-based running conversation index.

  tag_generator ends the last prompt turn with "(The answer is written by <generator>.)", so a single LenVM trained
  on all four generators can condition on which one is writing (the paper trains one LenVM per generator instead).

  max_problems keeps the first problems in sorted id order (for quick tests); the split is drawn among those.
  """
  import champ_dataset
  from champ_dataset.prompt import prompt_summarizer

  if turn not in TURNS:
    raise ValueError(f"turn must be one of {TURNS}, got {turn!r}")
  dataset = champ_dataset.load(version)
  problem_ids = sorted(dataset.problems)[:max_problems]
  split_of = split_groups(problem_ids, eval_fraction, seed)
  source = f"champ_dataset:{version}"
  prompt_cache = {}
  line = 0
  for problem_id in problem_ids:
    for key, conversation in (dataset.problems[problem_id].conversations or {}).items():
      line += 1
      try:
        yield _record(problem_id, key, conversation, turn, prompt_summarizer, split_of[problem_id], tokenizer,
                      prompt_cache, source, line, tag_generator)
      except RecordError as error:
        yield error
    prompt_cache.clear()  # Prompts are never shared across problems.
