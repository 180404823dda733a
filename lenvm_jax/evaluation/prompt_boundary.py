"""Prompt-boundary evaluation (docs/method.md §8): the MRE of L_hat against L_GT over prompt groups, and the
prompt-blind baselines it is compared with (the least-MRE constant, overall and per generator, and cell means).

numpy only, on prompt groups ({(prompt, generator): [completion lengths]}, lenvm_jax/data/prompt_groups.py); L_GT and
the relative error are value/targets.py's, which the gamma rules share.
"""

import collections

import numpy as np

from lenvm_jax.value.targets import groups_boundary_lengths, relative_length_error

ALL_GENERATORS = "*"


def scope_label(scope: str) -> str:
  """How reports print a scope: "all" for ALL_GENERATORS, else the generator's name."""
  return "all" if scope == ALL_GENERATORS else scope


def least_mre_length(true_lengths) -> float:
  """The constant c minimising mean |c - L| / max(L, 1) over the given L_GT: their median weighted by 1 / max(L, 1)."""
  lengths = np.sort(np.asarray(true_lengths, np.float64))
  cumulative = np.cumsum(1.0 / np.maximum(lengths, 1.0))
  return float(lengths[np.searchsorted(cumulative, cumulative[-1] / 2)])


def least_mre_by_generator(truths: dict) -> dict:
  """{generator: least-MRE constant} from {(prompt, generator): L_GT}: evaluate_lengths' generator baseline."""
  by_generator = collections.defaultdict(list)
  for (_, generator), truth in truths.items():
    by_generator[generator].append(truth)
  return {g: least_mre_length(v) for g, v in by_generator.items()}


def cell_mean_lengths(predicted: dict, cell_of, gamma: float) -> dict:
  """{key: L_hat} -> each key's L_hat replaced by the length of its cell's mean predicted return: the prediction
  without its prompt-specific part, to tell whether that part helps MRE (a part that is noise makes it worse)."""
  by_cell = collections.defaultdict(list)
  for key, length in predicted.items():
    by_cell[cell_of(key)].append(length)
  means = dict(zip(by_cell, groups_boundary_lengths(by_cell, gamma).tolist()))
  return {key: means[cell_of(key)] for key in predicted}


def prompt_boundary_mre(groups: dict, predicted: dict, gamma: float) -> dict:
  """The MRE of docs/method.md §8: mean over prompt groups of |L_hat - L_GT| / L_GT, overall ("*") and per generator.

  groups: {(prompt, generator): [lengths]} (prompt_groups.group_by_prompt); predicted: {same key: L_hat} or a
  function of the key. L_GT below 1 token counts as 1 so a prompt answered by EOS alone does not divide by ~0.
  """
  relative = collections.defaultdict(list)
  for key, error in zip(groups, prompt_boundary_errors(groups, predicted, gamma)):
    relative[ALL_GENERATORS].append(error)
    relative[key[1]].append(error)
  return {scope: float(np.mean(v)) for scope, v in relative.items()}


def prompt_boundary_errors(groups: dict, predicted, gamma: float) -> list[float]:
  """|L_hat - L_GT| / L_GT of every group, in the dict's order (what prompt_boundary_mre averages)."""
  guess = predicted if callable(predicted) else predicted.__getitem__
  return [float(relative_length_error(guess(key), truth))
          for key, truth in zip(groups, groups_boundary_lengths(groups, gamma).tolist())]
