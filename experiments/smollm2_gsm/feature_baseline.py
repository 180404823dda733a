"""How far one prompt feature gets in prompt-boundary MRE on SmolLM2 rollouts (experiments/smollm2_gsm/README.md).

  python -m experiments.smollm2_gsm.feature_baseline --feature=operator --rollouts=data/smollm2_arith/rollouts \
      --gamma=0.969984
  python -m experiments.smollm2_gsm.feature_baseline --feature=task --rollouts=data/smollm2_mix/rollouts \
      --prompts="$(python -c 'from experiments.configs.smollm2_mix import PROMPTS; print(PROMPTS)')" --gamma=GAMMA

Fits the least-MRE length per value of one feature, the operator (+, -, *, /) of a two-term `basic_arithmetic`
question or the reasoning-gym task of a mixed prompt source, on the training groups, and scores it on the held-out
groups next to the least-MRE constant fitted on the held-out groups themselves (an oracle; evaluate_lengths fits
its constant on the training groups). It uses evaluate_lengths' own groups (prompt_groups.boundary_groups) and metric
(prompt_boundary.prompt_boundary_mre); questions come back from the prompt spec (prompt ids are problem ids). A
predictor that knows the feature and nothing else: a LenVM that beats it reads more of the prompt than the feature. A
one-off check for that README, not part of the library.
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
_FEATURE = flags.DEFINE_enum("feature", "operator", ["operator", "task"],
                             "operator: of a basic_arithmetic question; task: the reasoning-gym task of the problem.")
_OPERATOR = re.compile(r"Calculate -?\d+ ([-+*/]) ")


def groups(split: str) -> dict:
  """{(prompt id, generator): [finished completion lengths]} of a split, as evaluate_lengths groups them."""
  source = arrayrecord.ArrayRecordTrajectories(f"{_ROLLOUTS.value}/{split}")
  return boundary_groups(source[i] for i in range(len(source)))


def main(argv):
  del argv
  if _FEATURE.value == "operator":
    questions = {p.problem_id: p.question for spec in answers.split_reasoning_gym_specs(_PROMPTS.value)
                 for p in answers.reasoning_gym_problems(*answers.parse_reasoning_gym_spec(spec))}
    feature = lambda key: _OPERATOR.search(questions[key[0]]).group(1)
  else:  # Problem ids are TASK{options}/seed/index.
    feature = lambda key: re.split(r"[{/]", key[0], maxsplit=1)[0]
  train, held_out = groups("train"), groups("eval")
  by_feature = collections.defaultdict(list)
  for key, length in zip(train, groups_boundary_lengths(train, _GAMMA.value)):
    by_feature[feature(key)].append(length)
  per_feature = {value: least_mre_length(v) for value, v in sorted(by_feature.items())}
  constant = least_mre_length(groups_boundary_lengths(held_out, _GAMMA.value))
  mre = lambda guess: prompt_boundary_mre(held_out, guess, _GAMMA.value)[ALL_GENERATORS]
  print(f"least-MRE length per {_FEATURE.value} (training groups): " +
        ", ".join(f"{value} {length:.1f} ({len(by_feature[value])} problems)" for value, length in per_feature.items()))
  print(f"held-out groups: {len(held_out)}")
  print(f"  per-{_FEATURE.value} lengths{' ' * (15 - len(_FEATURE.value))}MRE "
        f"{mre(lambda key: per_feature[feature(key)]):.4f}")
  print(f"  least-MRE constant (held-out) MRE {mre(lambda key: constant):.4f}  (constant {constant:.1f})")


if __name__ == "__main__":
  cli.run(main)
