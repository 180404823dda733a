"""How far one prompt feature gets in prompt-boundary MRE on the arithmetic rollouts (experiments/smollm2_gsm/
README.md, section 1).

  python -m experiments.smollm2_gsm.operator_baseline --rollouts=data/smollm2_arith/rollouts --gamma=0.969984

Fits the least-MRE length per operator (+, -, *, /) of a two-term `basic_arithmetic` question on the training groups
and scores it on the held-out groups, next to the least-MRE constant fitted on the held-out groups themselves (the
baseline evaluate_lengths prints). Groups are the finished completions of a prompt id, L_GT as evaluate_lengths
computes it; questions come back from the prompt spec (prompt ids are problem ids). A one-off check for that README,
specific to these questions; not part of the library.
"""

import collections
import re

import numpy as np
from absl import flags

from experiments import cli
from experiments.configs.smollm2_arith import PROMPTS
from lenvm_jax.data import answers, arrayrecord
from lenvm_jax.decoding.rollouts import read_records
from lenvm_jax.evaluation.prompt_boundary import least_mre_length
from lenvm_jax.value.targets import prompt_boundary_length, relative_length_error

_ROLLOUTS = flags.DEFINE_string("rollouts", "data/smollm2_arith/rollouts", "experiments.generate's output_dir.")
_PROMPTS = flags.DEFINE_string("prompts", PROMPTS, "The --prompts the rollouts were generated from.")
_GAMMA = flags.DEFINE_float("gamma", 0.969984, "The runs' resolved loss.gamma (in their config.json).")
_OPERATOR = re.compile(r"Calculate -?\d+ ([-+*/]) ")


def boundary_lengths(split: str) -> dict:
  """{prompt id: L_GT} of a split's finished completions."""
  lengths = collections.defaultdict(list)
  for record in read_records(arrayrecord.ArrayRecordTrajectories(f"{_ROLLOUTS.value}/{split}")):
    if record["finished"]:
      lengths[record["prompt_id"]].append(len(record["completion_ids"]))
  return {k: prompt_boundary_length(v, _GAMMA.value) for k, v in lengths.items()}


def main(argv):
  del argv
  questions = {p.problem_id: p.question for p in answers.reasoning_gym_problems(
      *answers.parse_reasoning_gym_spec(_PROMPTS.value))}
  operator = lambda prompt_id: _OPERATOR.search(questions[prompt_id]).group(1)
  train, held_out = boundary_lengths("train"), boundary_lengths("eval")
  by_operator = collections.defaultdict(list)
  for prompt_id, length in train.items():
    by_operator[operator(prompt_id)].append(length)
  per_operator = {op: least_mre_length(v) for op, v in sorted(by_operator.items())}
  constant = least_mre_length(list(held_out.values()))
  mre = lambda guess: np.mean([relative_length_error(guess(k), v) for k, v in held_out.items()])
  print("least-MRE length per operator (training groups): " +
        ", ".join(f"{op} {length:.1f} ({len(by_operator[op])} problems)" for op, length in per_operator.items()))
  print(f"held-out groups: {len(held_out)}")
  print(f"  per-operator lengths          MRE {mre(lambda k: per_operator[operator(k)]):.4f}")
  print(f"  least-MRE constant (held-out) MRE {mre(lambda k: constant):.4f}  (constant {constant:.1f})")


if __name__ == "__main__":
  cli.run(main)
