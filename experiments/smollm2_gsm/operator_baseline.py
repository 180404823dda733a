"""How far one prompt feature gets in prompt-boundary MRE on the arithmetic rollouts (experiments/smollm2_gsm/
README.md, section 1).

  python -m experiments.smollm2_gsm.operator_baseline --rollouts=data/smollm2_arith/rollouts --gamma=0.969984

Fits the least-MRE length per operator (+, -, *, /) of a two-term `basic_arithmetic` question on the training groups
and scores it on the held-out groups, next to the least-MRE constant fitted on the held-out groups themselves (the
baseline evaluate_lengths prints), with evaluate_lengths' own groups (prompt_groups.boundary_groups) and metric
(prompt_boundary.prompt_boundary_mre); questions come back from the prompt spec (prompt ids are problem ids). A
one-off check for that README, specific to these questions; not part of the library.
"""

import collections
import re

from absl import flags

from experiments import cli
from experiments.configs.smollm2_arith import PROMPTS
from lenvm_jax.data import answers, arrayrecord
from lenvm_jax.data.prompt_groups import boundary_groups
from lenvm_jax.evaluation.prompt_boundary import ALL_GENERATORS, least_mre_length, prompt_boundary_mre
from lenvm_jax.value.targets import groups_boundary_lengths

_ROLLOUTS = flags.DEFINE_string("rollouts", "data/smollm2_arith/rollouts", "experiments.generate's output_dir.")
_PROMPTS = flags.DEFINE_string("prompts", PROMPTS, "The --prompts the rollouts were generated from.")
_GAMMA = flags.DEFINE_float("gamma", 0.969984, "The runs' resolved loss.gamma (in their config.json).")
_OPERATOR = re.compile(r"Calculate -?\d+ ([-+*/]) ")


def groups(split: str) -> dict:
  """{(prompt id, generator): [finished completion lengths]} of a split, as evaluate_lengths groups them."""
  source = arrayrecord.ArrayRecordTrajectories(f"{_ROLLOUTS.value}/{split}")
  return boundary_groups(source[i] for i in range(len(source)))


def main(argv):
  del argv
  questions = {p.problem_id: p.question for p in answers.reasoning_gym_problems(
      *answers.parse_reasoning_gym_spec(_PROMPTS.value))}
  operator = lambda key: _OPERATOR.search(questions[key[0]]).group(1)
  train, held_out = groups("train"), groups("eval")
  by_operator = collections.defaultdict(list)
  for key, length in zip(train, groups_boundary_lengths(train, _GAMMA.value)):
    by_operator[operator(key)].append(length)
  per_operator = {op: least_mre_length(v) for op, v in sorted(by_operator.items())}
  constant = least_mre_length(groups_boundary_lengths(held_out, _GAMMA.value))
  mre = lambda guess: prompt_boundary_mre(held_out, guess, _GAMMA.value)[ALL_GENERATORS]
  print("least-MRE length per operator (training groups): " +
        ", ".join(f"{op} {length:.1f} ({len(by_operator[op])} problems)" for op, length in per_operator.items()))
  print(f"held-out groups: {len(held_out)}")
  print(f"  per-operator lengths          MRE {mre(lambda key: per_operator[operator(key)]):.4f}")
  print(f"  least-MRE constant (held-out) MRE {mre(lambda key: constant):.4f}  (constant {constant:.1f})")


if __name__ == "__main__":
  cli.run(main)
