"""Prompt JSONL for rollouts: token ids, chat messages and text render as the tokenizer does; bad lines are named."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lenvm_jax.data import arrayrecord
from lenvm_jax.data.prompts import load_prompts, read_prompt_jsonl
from lenvm_jax.data.records import RecordError, Trajectory
from lenvm_jax.data.tokenizer import load_tokenizer
from tests.helpers import REPO
from tests.helpers import CHATML, build_tokenizer_json, chatml_tokenizer_dir


def write_lines(path, objects):
  path.write_text("".join(json.dumps(o) + "\n" for o in objects))
  return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return load_tokenizer(chatml_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_ids_messages_and_text_prompts(tmp_path, tokenizer):
  messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}]
  path = write_lines(tmp_path / "p.jsonl", [
      {"prompt_ids": [3, 4, 5], "prompt_id": "a", "split": "eval"},
      {"messages": messages, "prompt_id": 7},
      {"prompt": "The answer is 42."}])
  ids, chat, text = read_prompt_jsonl(path, tokenizer.vocab_size, tokenizer)
  assert ids.prompt_ids.tolist() == [3, 4, 5] and ids.prompt_id == "a" and ids.split == "eval"
  assert chat.prompt_ids.tolist() == tokenizer.prompt_ids(messages) and chat.prompt_id == "7" and chat.split is None
  assert text.prompt_ids.tolist() == tokenizer.prompt_ids([{"role": "user", "content": "The answer is 42."}])
  assert text.prompt_id == "3"  # Default: the line number.


@pytest.mark.parametrize("line, field", [
    ({"prompt_ids": [1, 2], "messages": []}, "<record>"),
    ({"prompt_ids": [1, 999]}, "prompt_ids"),
    ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt_ids": [1], "extra": 1}, "extra"),
    ({"prompt_ids": [1], "split": "test"}, "split"),
    ({"prompt": "hi"}, "prompt"),  # No tokenizer given.
])
def test_bad_prompt_lines_name_line_and_field(tmp_path, line, field):
  path = write_lines(tmp_path / "bad.jsonl", [{"prompt_ids": [1, 2]}, line])
  with pytest.raises(RecordError) as error:
    read_prompt_jsonl(path, 64)
  assert (error.value.line, error.value.field) == (2, field)


def test_repeated_prompt_id_is_an_error(tmp_path):
  path = write_lines(tmp_path / "dup.jsonl", [{"prompt_ids": [1], "prompt_id": "x"},
                                              {"prompt_ids": [2], "prompt_id": "x"}])
  with pytest.raises(RecordError, match="repeats line 1"):
    read_prompt_jsonl(path, 64)


def test_prompts_for_prediction_name_the_bad_field_and_keep_a_missing_id_unnamed(tmp_path):
  """experiments/predict.py --mode=prompts reads the same JSONL, without a tokenizer, as trajectories to score."""
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt_ids": [3, 4], "prompt_id": "a"}\n{"prompt": [1]}\n')
  with pytest.raises(RecordError, match="prompt_ids.*missing"):
    read_prompt_jsonl(str(path), 64, name_by_line=False)
  path.write_text('{"prompt_ids": [3, 4], "prompt_id": "a"}\n')
  (record,) = [p.as_trajectory() for p in read_prompt_jsonl(str(path), 64, name_by_line=False)]
  assert record.prompt_ids.tolist() == [3, 4] and record.prompt_id == "a" and len(record.completion_ids) == 0
  path.write_text('{"prompt_ids": [3], "prompt_id": "q", "generator": "g"}\n{"prompt_ids": [3], "prompt_id": "q", '
                  '"generator": "h"}\n{"prompt_ids": [5]}\n')
  one, other, unnamed = read_prompt_jsonl(str(path), 64, name_by_line=False)
  assert (one.generator, other.generator, unnamed.prompt_id) == ("g", "h", None)


def test_prompts_of_existing_shards_are_distinct(tmp_path):
  records = [Trajectory(np.asarray(p, np.int32), np.asarray([9, 1], np.int32), True, pid)
             for p, pid in (([3, 4], "a"), ([3, 4], "a"), ([5], "b"), ([6], None))]
  arrayrecord.write_shard(arrayrecord.shard_path(str(tmp_path), "train", 0, 1),
                          [arrayrecord.encode(r) for r in records])
  prompts = load_prompts(f"arrayrecord:{tmp_path}/train", 64)
  assert [p.prompt_ids.tolist() for p in prompts] == [[3, 4], [5], [6]]
  assert [p.prompt_id for p in prompts[:2]] == ["a", "b"]


def test_generate_cli_reports_bad_input_in_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.generate", f"--policy={tmp_path / 'nothing'}",
                        "--prompts=p.jsonl", f"--output_dir={tmp_path / 'out'}", "--eos_ids=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "nothing" in run.stderr
