"""Prompt-boundary length (spec section 4): L_GT of a prompt group, the MRE of L_hat against it, and the choices
that minimise it (the least-MRE constant, the least-MRE gamma).

numpy only, on prompt groups (lenvm_jax/data/prompt_groups.py): the gamma rules (model.gamma="auto_mre", data stats)
and the evaluation (evaluation/length_eval.py) share these definitions.
"""

import collections

import numpy as np

ALL_GENERATORS = "*"


def prompt_boundary_length(lengths, gamma: float) -> float:
  """L_GT of a prompt from its sampled completion lengths: the length whose return is the mean return."""
  # log(1 - mean return) = log(mean(gamma ** L)), summed in log space: gamma ** L underflows to 0 for long L.
  log_terms = np.asarray(lengths, np.float64) * np.log(gamma)
  top = log_terms.max()
  return float((top + np.log(np.mean(np.exp(log_terms - top)))) / np.log(gamma))


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
  means = {cell: prompt_boundary_length(lengths, gamma) for cell, lengths in by_cell.items()}
  return {key: means[cell_of(key)] for key in predicted}


def prompt_boundary_mre(groups: dict, predicted: dict, gamma: float) -> dict:
  """Spec section 4 MRE: mean over prompt groups of |L_hat - L_GT| / L_GT, overall ("*") and per generator.

  groups: {(prompt, generator): [lengths]} (prompt_groups.group_by_prompt); predicted: {same key: L_hat} or a
  function of the key. L_GT below 1 token counts as 1 so a prompt answered by EOS alone does not divide by ~0.
  """
  guess = predicted if callable(predicted) else predicted.__getitem__
  relative = collections.defaultdict(list)
  for key, lengths in groups.items():
    truth = prompt_boundary_length(lengths, gamma)
    error = abs(guess(key) - truth) / max(truth, 1.0)
    relative[ALL_GENERATORS].append(error)
    relative[key[1]].append(error)
  return {scope: float(np.mean(v)) for scope, v in relative.items()}


def least_mre_gamma(groups: dict, horizons: int = 160) -> tuple[float, float]:
  """(gamma, training MRE) for model.gamma = "auto_mre": the gamma under which a LenVM that knows only the generator
  has the least prompt-boundary MRE on the training groups ({(prompt, generator): [lengths]},
  prompt_groups.group_by_prompt).

  Such a LenVM's V(s_0) is the generator's mean return, so its L_hat is the log-mean of gamma ** L: a certainty
  equivalent that lies further below the mean length as gamma falls. MRE rewards the 1/L-weighted median, which lies
  below the mean for right-skewed lengths, so the spec's p99 rule (made for per-token resolution) overshoots it.
  Searched over horizons 1 / (1 - gamma) from 2 tokens to 4x the longest completion, log-spaced.
  """
  if not groups:
    raise ValueError("model.gamma='auto_mre' needs finished completions in the training split; there are none")
  # Flat arrays so each candidate gamma costs a few numpy passes: lengths in group order, their group and generator.
  generators = sorted({generator for _, generator in groups})
  lengths = np.concatenate([np.asarray(v, np.float64) for v in groups.values()])
  sizes = np.array([len(v) for v in groups.values()])
  group_generator = np.array([generators.index(generator) for _, generator in groups])
  sample_generator = np.repeat(group_generator, sizes)

  def log_mean_exp(x, index, count):  # Per-bucket log(mean(exp(x))), stable for very negative x.
    top = np.full(count, -np.inf)
    np.maximum.at(top, index, x)
    return top + np.log(np.bincount(index, np.exp(x - top[index]), count) / np.bincount(index, minlength=count))

  best = None
  for horizon in np.geomspace(2.0, 4.0 * max(lengths.max(), 2.0), horizons):
    gamma = 1.0 - 1.0 / horizon
    log_terms = lengths * np.log(gamma)
    truth = log_mean_exp(log_terms, np.repeat(np.arange(len(sizes)), sizes), len(sizes)) / np.log(gamma)
    guess = log_mean_exp(log_terms, sample_generator, len(generators)) / np.log(gamma)
    mre = float(np.mean(np.abs(guess[group_generator] - truth) / np.maximum(truth, 1.0)))
    if best is None or mre < best[1]:
      best = (float(gamma), mre)
  return best


def cell_headroom(groups: dict, problem_of, cell_of, gamma: float, splits: int = 100, fraction: float = 0.2,
                  seed: int = 0) -> dict:
  """How often an exact, MSE-trained LenVM that knows only a prompt's cell beats the per-generator least-MRE
  constant in prompt-boundary MRE, over random problem splits of `groups` ({(prompt, generator): [lengths]}).

  A LenVM whose V(s_0) is its cell's mean return predicts the cell's pooled L_GT (a certainty equivalent, which
  depends on gamma); the constant is the generator's 1/L-weighted median. problem_of(key) keeps a problem's prompts on
  one side of a split; cell_of(key) is what the LenVM can tell from the prompt (e.g. generator and prompt setting).
  Returns {"cell", "generator", "constant": mean MRE over splits; "cell_wins": share of splits where cell < constant}.
  """
  from lenvm_jax.data.prompt_groups import split_groups  # The split rule of prepare_data and carve_validation.
  keys = list(groups)
  problems = sorted({problem_of(k) for k in keys})
  if len(problems) < 2:
    raise ValueError("cell_headroom needs prompts of at least two problems to split")
  truths = {k: prompt_boundary_length(groups[k], gamma) for k in keys}
  result = {"cell": [], "generator": [], "constant": []}
  for split in range(splits):
    side = split_groups(problems, fraction, seed + split)
    held = {k: groups[k] for k in keys if side[problem_of(k)] == "eval"}
    tables = {"cell": collections.defaultdict(list), "generator": collections.defaultdict(list)}
    for key in keys:
      if key not in held:
        tables["cell"][cell_of(key)].extend(groups[key])
        tables["generator"][key[1]].extend(groups[key])
    pooled = {name: {c: prompt_boundary_length(v, gamma) for c, v in table.items()} for name, table in tables.items()}
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
