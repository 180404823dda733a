"""EOS ids for decoding with a run's model: the data's own EOS, not the synthetic generator's id (a run on a real
tokenizer stopped on the wrong token when experiments/evaluate.py hard-coded the synthetic id)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lenvm_jax.data.records import Trajectory
from lenvm_jax.data.synthetic import EOS_ID, SyntheticPolicy
from lenvm_jax.decoding.eos import eos_ids_of_data, generator_eos_ids
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
  subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", "--generator=shared",
                  "--prompts=8", "--targets=4", "--betas=0", "--trajectories=8", "--budget=8", "--batch_size=8"],
                 cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
  report = json.loads((workdir / "evaluate" / "report.json").read_text())
  assert report["eos_ids"] == [REAL_EOS]
