"""CHAMP importer: records decode to the dataset's text, splits by problem, flags follow the length-limit errors."""

import collections

import numpy as np
import pytest

from lenvm_jax.data import champ
from lenvm_jax.data.arrayrecord import ArrayRecordTrajectories
from lenvm_jax.data.prepare import ImportedRecord, prepare
from lenvm_jax.data.prompt_groups import split_groups
from lenvm_jax.data.records import RecordError
from lenvm_jax.data.tokenizer import load_tokenizer

champ_dataset = pytest.importorskip("champ_dataset")

MAX_PROBLEMS = 6  # The first 6 sorted ids include P_Combinatorics_14, which has unfinished solutions.
GENERATORS = {"GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium"}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(champ.default_tokenizer_path())


@pytest.fixture(scope="module")
def dataset():
  return champ_dataset.load("v0")


@pytest.fixture(scope="module")
def records(tok):
  items = list(champ.iter_champ(tok, max_problems=MAX_PROBLEMS))
  assert all(isinstance(item, ImportedRecord) for item in items), [str(i) for i in items if isinstance(i, Exception)]
  return items


def solution_message(dataset, record):
  """The dataset's solution turn: the model turn before CHAMP's closing "summarize" request."""
  meta = record.meta
  messages = dataset.problems[meta["problem_id"]].conversations[f"{meta['generator']}|{meta['setting']}"].messages
  return messages, len(messages) - 3


def mistral_v1_text(messages) -> str:
  """What the Mistral v1 prompt decodes to, whitespace collapsed: system joins the first [INST]."""
  system = "\n\n".join(m.text for m in messages if m.role == "System")
  parts, first_user = [], True
  for m in messages:
    if m.role == "User":
      parts.append(f"[INST] {system}\n\n{m.text} [/INST]" if first_user else f"[INST] {m.text} [/INST]")
      first_user = False
    elif m.role != "System":
      parts.append(m.text)
  return " ".join(" ".join(parts).split())


def test_default_tokenizer_is_mistral_v1(tok):
  assert champ.default_tokenizer_path().endswith("tokenizer.model.v1")
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (32000, 2, 1)


def test_records_decode_to_the_dataset_text(records, dataset, tok):
  assert len(records) == MAX_PROBLEMS * 72
  for record in records:
    messages, index = solution_message(dataset, record)
    t = record.trajectory
    assert record.text == messages[index].text
    body = t.completion_ids[:-1] if t.finished else t.completion_ids
    assert tok.decode(body) == messages[index].text  # SentencePiece round-trips this text exactly.
    assert t.prompt_ids[0] == tok.bos_id
    assert " ".join(tok.decode(t.prompt_ids).split()) == mistral_v1_text(messages[:index])


def test_unfinished_flags_follow_the_length_limit_error(records, dataset, tok):
  unfinished = 0
  for record in records:
    messages, index = solution_message(dataset, record)
    t = record.trajectory
    assert t.finished == (messages[index].error != champ.LENGTH_CURRENT)
    assert (t.completion_ids[-1] == tok.eos_id) == t.finished
    unfinished += not t.finished
  assert unfinished == 3  # P_Combinatorics_14's three LENGTH_CURRENT solutions.


def test_split_is_by_problem_and_deterministic(records, tok):
  problems_of = collections.defaultdict(set)
  for record in records:
    problems_of[record.split].add(record.meta["problem_id"])
  assert problems_of["eval"] and problems_of["train"]
  assert not problems_of["eval"] & problems_of["train"]
  assert len(problems_of["eval"]) == round(0.2 * MAX_PROBLEMS)
  again = list(champ.iter_champ(tok, max_problems=MAX_PROBLEMS))
  assert [r.split for r in again] == [r.split for r in records]
  full = split_groups([f"P_{i}" for i in range(270)], eval_fraction=0.2, seed=0)
  assert collections.Counter(full.values()) == {"eval": 54, "train": 216}
  assert full != split_groups(list(full), eval_fraction=0.2, seed=1)
  with pytest.raises(ValueError, match="eval_fraction"):
    split_groups(["P_1"], eval_fraction=1.0, seed=0)


def test_generators_prompt_ids_meta_and_lines(records):
  assert {r.trajectory.generator for r in records} == GENERATORS
  assert [r.line for r in records] == list(range(1, len(records) + 1))
  assert {r.source for r in records} == {"champ_dataset:v0"}
  per_problem = collections.Counter(r.meta["problem_id"] for r in records)
  assert set(per_problem.values()) == {72}
  for r in records:
    assert r.meta["generator"] == r.trajectory.generator
    assert r.trajectory.prompt_id == f"{r.meta['problem_id']}|{r.meta['setting']}"
  group_sizes = collections.Counter(r.trajectory.prompt_id for r in records)
  assert set(group_sizes.values()) == {4} and len(group_sizes) == MAX_PROBLEMS * 18


def test_summary_turn_takes_the_final_response_and_rejects_ungenerated_ones(tok, dataset):
  items = list(champ.iter_champ(tok, max_problems=MAX_PROBLEMS, turn="summary"))
  errors = [i for i in items if isinstance(i, RecordError)]
  assert len(errors) == 3 and all("LENGTH_PREVIOUS" in str(e) for e in errors)
  for record in (i for i in items if isinstance(i, ImportedRecord)):
    messages = dataset.problems[record.meta["problem_id"]].conversations[
        f"{record.meta['generator']}|{record.meta['setting']}"].messages
    assert record.text == messages[-1].text and record.trajectory.finished
  with pytest.raises(ValueError, match="turn"):
    next(champ.iter_champ(tok, turn="last"))


def test_prepare_writes_shards_that_read_back_exactly(records, tmp_path):
  result = prepare(records, str(tmp_path), vocab_size=32000, max_len=8192, shard_size=100)
  by_split = {split: [r.trajectory for r in records if r.split == split] for split in ("train", "eval")}
  assert result["records"] == {split: len(items) for split, items in by_split.items()}
  assert sum(stats["overall"]["unfinished"] for stats in result["splits"].values()) == 3
  for split, expected in by_split.items():
    source = ArrayRecordTrajectories(str(tmp_path / split))
    assert len(source) == len(expected)
    for i, want in enumerate(expected):
      got = source[i]
      np.testing.assert_array_equal(got.prompt_ids, want.prompt_ids)
      np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
      assert (got.finished, got.prompt_id, got.generator) == (want.finished, want.prompt_id, want.generator)


def test_prepare_data_cli_needs_no_input_or_tokenizer_for_champ():
  from absl import flags

  from experiments import prepare_data
  assert prepare_data.FORMATS["champ"] is prepare_data.champ_records
  was_parsed = flags.FLAGS.is_parsed()  # Other tests may rely on the global flags staying parsed.
  try:
    flags.FLAGS(["prepare_data", "--format=champ", "--output_dir=unused"])
    assert prepare_data.tokenizer_path() == champ.default_tokenizer_path()
    assert prepare_data.vocab_size() == 32000
    flags.FLAGS.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError, match="--input is required"):
      flags.FLAGS(["prepare_data", "--format=reference_jsonl", "--output_dir=unused"])
  finally:
    flags.FLAGS.unparse_flags()
    if was_parsed:
      flags.FLAGS.mark_as_parsed()
    prepare_data.tokenizer.cache_clear()


def test_tag_generator_names_the_generator_in_the_prompt(tok):
  item = next(i for i in champ.iter_champ(tok, max_problems=1, tag_generator=True) if not isinstance(i, Exception))
  text = tok.decode(item.trajectory.prompt_ids)
  assert f"written by {item.trajectory.generator}" in text[-80:]  # At the end: survives a left-cut prompt.
