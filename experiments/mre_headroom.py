"""Chooses gamma for a job judged by prompt-boundary MRE, from the training split alone.

  python -m experiments.mre_headroom --data_dir=data/champ --gammas=0.9974,0.996,0.995

For each gamma, over random problem splits of the training prompts: the MRE of an exact LenVM that knows only the
prompt's cell (generator plus the prompt_id after the separator: CHAMP's prompt setting), of one that knows only the
generator, of the per-generator least-MRE constant (evaluate_lengths' baseline), and how often the first beats the
last. An MSE-trained LenVM predicts a certainty equivalent, so at a large gamma even a perfect one can lose to the
constant; see lenvm_jax/evaluation/headroom.py.
"""

import os

from absl import flags

from experiments import cli
from lenvm_jax.data import arrayrecord, prompt_groups
from lenvm_jax.evaluation import headroom

_DATA = flags.DEFINE_string("data_dir", None, "A prepare_data output directory (only its train split is read).")
_GAMMAS = flags.DEFINE_list("gammas", ["0.9974", "0.996", "0.995"], "Discount factors to compare.")
_SPLITS = flags.DEFINE_integer("splits", 100, "Random problem splits per gamma.")
_FRACTION = flags.DEFINE_float("fraction", 0.2, "Share of problems held out in each split.")
_SEPARATOR = flags.DEFINE_string("group_separator", prompt_groups.PROMPT_ID_SEPARATOR,
                                 "prompt_id = <problem><separator><cell>; empty: no cells.")
flags.mark_flags_as_required(["data_dir"])


def main(argv):
  del argv
  with cli.user_errors(FileNotFoundError):  # No train shards under --data_dir.
    source = arrayrecord.ArrayRecordTrajectories(os.path.join(_DATA.value, "train"))
  groups = prompt_groups.group_by_prompt(source[i] for i in range(len(source)))
  separator = _SEPARATOR.value
  if any(not isinstance(prompt, str) for prompt, _ in groups):
    raise cli.errors.UserError.at("a record without a prompt_id", f"--data_dir={_DATA.value}",
                                  "mre_headroom reads problems and cells from prompt ids: import with prompt ids")

  print(f"{len(groups)} training prompt groups; MRE means over {_SPLITS.value} splits holding out "
        f"{_FRACTION.value:.0%} of the problems")
  print(f"{'gamma':>8} {'cell LenVM':>11} {'generator LenVM':>16} {'constant':>9} {'cell beats constant':>20}")
  for gamma in map(float, _GAMMAS.value):
    r = headroom.cell_headroom(groups, lambda key: prompt_groups.problem_of(key[0], separator),
                               lambda key: prompt_groups.cell_of(key, separator), gamma, _SPLITS.value,
                               _FRACTION.value)
    print(f"{gamma:8.5g} {r['cell']:11.4f} {r['generator']:16.4f} {r['constant']:9.4f} {r['cell_wins']:20.0%}")


if __name__ == "__main__":
  cli.run(main)
