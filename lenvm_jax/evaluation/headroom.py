"""A research simulation for choosing gamma under prompt-boundary MRE (experiments/mre_headroom.py): how much an
exact LenVM that knows only a prompt's cell (e.g. CHAMP's prompt setting) could gain over the prompt-blind
least-MRE constant, before any model is trained.
"""

import collections

import numpy as np

from lenvm_jax.data.prompt_groups import split_groups
from lenvm_jax.evaluation.prompt_boundary import ALL_GENERATORS, least_mre_by_generator, prompt_boundary_mre
from lenvm_jax.value.targets import groups_boundary_lengths


def cell_headroom(groups: dict, problem_of, cell_of, gamma: float, splits: int = 100, fraction: float = 0.2,
                  seed: int = 0) -> dict:
  """How often an exact, MSE-trained LenVM that knows only a prompt's cell beats the per-generator least-MRE
  constant in prompt-boundary MRE, over random problem splits of `groups` ({(prompt, generator): [lengths]}).

  A LenVM whose V(s_0) is its cell's mean return predicts the cell's pooled L_GT (a certainty equivalent, which
  depends on gamma); the constant is the generator's 1/L-weighted median. problem_of(key) keeps a problem's prompts on
  one side of a split; cell_of(key) is what the LenVM can tell from the prompt (e.g. generator and prompt setting).
  Returns {"cell", "generator", "constant": mean MRE over splits; "cell_wins": share of splits where cell < constant}.
  """
  keys = list(groups)
  problems = sorted({problem_of(k) for k in keys})
  if len(problems) < 2:
    raise ValueError("cell_headroom needs prompts of at least two problems to split")
  truths = dict(zip(keys, groups_boundary_lengths(groups, gamma).tolist()))
  result = {"cell": [], "generator": [], "constant": []}
  for split in range(splits):
    side = split_groups(problems, fraction, seed + split)
    held = {k: groups[k] for k in keys if side[problem_of(k)] == "eval"}
    tables = {"cell": collections.defaultdict(list), "generator": collections.defaultdict(list)}
    for key in keys:
      if key not in held:
        tables["cell"][cell_of(key)].extend(groups[key])
        tables["generator"][key[1]].extend(groups[key])
    pooled = {name: dict(zip(table, groups_boundary_lengths(table, gamma).tolist())) for name, table in tables.items()}
    constant = least_mre_by_generator({k: truth for k, truth in truths.items() if k not in held})
    missing = {k[1] for k in held} - set(constant)
    if missing:
      raise ValueError(f"split {split}: generators {sorted(missing)} have no training prompts")
    # A cell with no training prompt (rare) gets its generator's pooled L_GT, as a LenVM that never saw it would.
    guesses = {"cell": lambda k: pooled["cell"].get(cell_of(k), pooled["generator"][k[1]]),
               "generator": lambda k: pooled["generator"][k[1]], "constant": lambda k: constant[k[1]]}
    for name, guess in guesses.items():
      result[name].append(prompt_boundary_mre(held, guess, gamma)[ALL_GENERATORS])
  wins = float(np.mean(np.array(result["cell"]) < np.array(result["constant"])))
  return {**{name: float(np.mean(v)) for name, v in result.items()}, "cell_wins": wins}
