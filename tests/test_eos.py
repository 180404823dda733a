"""EOS ids for decoding with a run's model: the data's own EOS, not the synthetic generator's id (a run on a real
tokenizer stopped on the wrong token when experiments/evaluate.py hard-coded the synthetic id); the run records them
in its config.json, and a run from before the record derives them as before."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lenvm_jax.data.records import Trajectory
from lenvm_jax.data.synthetic import EOS_ID, SyntheticPolicy
from lenvm_jax.decoding import policy as policy_lib
from lenvm_jax.decoding.eos import generator_eos_ids
from lenvm_jax.run import config_history, eos as run_eos
from lenvm_jax.run.eos import eos_ids_of_data
from tests.helpers import REPO, run_config

REAL_EOS = 5  # Not the synthetic id (1): what a real tokenizer's EOS looks like to these tests.


def _trajectory(completion, finished=True):
  return Trajectory(np.asarray([3, 4], np.int32), np.asarray(completion, np.int32), finished)


def test_eos_ids_come_from_the_caller_the_tokenizer_or_the_data_in_that_order():
  data = [_trajectory([9, 9, REAL_EOS]), _trajectory([8, 11], finished=False), _trajectory([REAL_EOS])]
  assert eos_ids_of_data(data) == (REAL_EOS,)
  assert generator_eos_ids("shared", trajectories=data) == (REAL_EOS,) != (EOS_ID,)
  assert generator_eos_ids("shared", tokenizer_eos=7, trajectories=data) == (7,)
  assert generator_eos_ids("shared", explicit=["2", "3"], tokenizer_eos=7, trajectories=data) == (2, 3)
  assert generator_eos_ids("synthetic", trajectories=data) == (EOS_ID,)
  with pytest.raises(ValueError, match="--eos_ids"):
    generator_eos_ids("shared", trajectories=[_trajectory([8, 11], finished=False)])


def _run_dir(path, run, record=None):
  """A run directory as the trainer leaves it (config.json, with `record` as its run_record, and checkpoints/)."""
  (path / "checkpoints").mkdir(parents=True)
  config_history.write_config(str(path), run, record=record)
  return str(path)


def test_a_run_answers_its_eos_ids_from_its_record_and_a_run_from_before_it_as_before(tiny_config, tmp_path):
  data = [_trajectory([9, 9, REAL_EOS]), _trajectory([8, 11], finished=False)]
  tiny_config.data.source = "jsonl"
  tiny_config.data.train_path = "train.jsonl"
  jsonl_run = run_config(tiny_config)
  # What the trainer records: the finished completions' last tokens; data.eos_id when none finished.
  assert run_eos.record(jsonl_run, data) == {"eos_ids": [REAL_EOS], "tokenizer": None,
                                             "eos_source": "the training data's finished completions"}
  assert run_eos.record(jsonl_run, data[1:])["eos_ids"] == []
  tiny_config.data.eos_id = 7
  assert run_eos.record(run_config(tiny_config), data[1:])["eos_ids"] == [7]
  tiny_config.data.source = "synthetic"
  synthetic_run = run_config(tiny_config)
  assert run_eos.record(synthetic_run, data)["eos_ids"] == [EOS_ID]

  recorded = _run_dir(tmp_path / "new", jsonl_run, {"eos_ids": [6], "eos_source": "test", "tokenizer": "/tok"})
  assert config_history.read_config(recorded) == jsonl_run  # The record is no config field.
  assert run_eos.run_eos_ids(recorded, data) == (6,) and run_eos.run_tokenizer(recorded) == "/tok"
  assert generator_eos_ids("shared", trajectories=data, workdir=recorded) == (6,)
  assert generator_eos_ids("shared", tokenizer_eos=9, trajectories=data, workdir=recorded) == (9,)  # Caller first.
  assert policy_lib.read_eos_ids(recorded) == () and policy_lib.run_eos_ids(recorded) == (6,)  # After --tokenizer.

  old = _run_dir(tmp_path / "old", jsonl_run)  # From before the record: derived as the tools always did.
  assert run_eos.run_eos_ids(old, data) == run_eos.run_eos_ids(old, lambda: data) == (REAL_EOS,)
  assert generator_eos_ids("shared", trajectories=data, workdir=old) == (REAL_EOS,)
  assert policy_lib.run_eos_ids(old) == () and run_eos.run_tokenizer(old) is None
  assert run_eos.run_eos_ids(_run_dir(tmp_path / "old_synthetic", synthetic_run)) == (EOS_ID,)


def test_the_tokenizer_is_the_one_the_data_was_imported_with(tiny_config, tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "import.json").write_text(json.dumps({"format": "reference_jsonl", "tokenizer": "/hf/tok"}))
  tiny_config.data.source = "arrayrecord"
  tiny_config.data.train_path = str(tmp_path / "data" / "train")
  assert run_eos.data_tokenizer(run_config(tiny_config)) == "/hf/tok"
  tiny_config.data.train_path = str(tmp_path / "elsewhere" / "train-*.array_record")
  assert run_eos.data_tokenizer(run_config(tiny_config)) is None


def _swap(tokens, a, b):
  tokens = np.asarray(tokens).copy()
  at_a, at_b = tokens == a, tokens == b
  tokens[at_a], tokens[at_b] = b, a
  return tokens


@pytest.mark.slow
def test_evaluate_with_the_shared_generator_stops_on_the_data_eos(tiny_config, tmp_path):
  """A run on JSONL data whose EOS is token 5 (synthetic trajectories with ids 1 and 5 swapped), trained with an LM
  head; experiments.evaluate --generator=shared must decode with EOS 5."""
  from lenvm_jax.train import trainer  # pylint: disable=g-import-not-at-top
  policy = SyntheticPolicy(vocab_size=64, hazards=(0.05, 0.3))
  for split, count in (("train", 256), ("eval", 32)):
    with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for i in range(count):
        t = policy.sample(np.random.default_rng([split == "eval", i]))
        f.write(json.dumps({"prompt_ids": _swap(t.prompt_ids, EOS_ID, REAL_EOS).tolist(),
                            "completion_ids": _swap(t.completion_ids, EOS_ID, REAL_EOS).tolist(),
                            "finished": bool(t.finished)}) + "\n")
  config = tiny_config
  config.data.source = "jsonl"
  config.data.train_path = str(tmp_path / "train.jsonl")
  config.data.eval_path = str(tmp_path / "eval.jsonl")
  config.loss.lm_weight = 1.0
  config.train.steps = 4
  config.train.eval_every = 0
  config.mesh.data = 1
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(run_config(config), str(workdir))
  # The run records the ids it was trained on (train-time record, read by every tool through run/eos.py).
  assert json.loads((workdir / "config.json").read_text())["run_record"] == {
      "eos_ids": [REAL_EOS], "eos_source": "the training data's finished completions", "tokenizer": None}
  subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", "--generator=shared",
                  "--prompts=8", "--targets=4", "--betas=0", "--trajectories=8", "--budget=8", "--batch_size=8"],
                 cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
  report = json.loads((workdir / "evaluate" / "report.json").read_text())
  assert report["eos_ids"] == [REAL_EOS]
