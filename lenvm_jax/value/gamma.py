"""The discount gamma: the rules that pick it from completion lengths, and the resolution of loss.gamma (and of
loss.length_normalizer, the other loss setting read from the data).

A run whose config says loss.gamma = "auto" or "auto_mre" gets a number from its training split once, at the start
(`resolve`), before anything is built; so does loss.length_normalizer = 0 under target_type 'normalized_length'. The
resolved RunConfig is what config.json records and what prediction, export and evaluation later read.
"""

import dataclasses

import logging

import numpy as np

from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import prompt_groups, stats
from lenvm_jax.value.targets import prompt_boundary_lengths, relative_length_error


def p99_gamma(p99_length: float) -> float:
  """docs/method.md §7: gamma with 1 - gamma ** L_p99 = 0.99, i.e. gamma = 0.01 ** (1 / L_p99)."""
  return float(0.01 ** (1.0 / max(p99_length, 1.0)))


def least_mre_gamma(groups: dict, horizons: int = 160) -> tuple[float, float]:
  """(gamma, training MRE) for loss.gamma = "auto_mre": the gamma under which a LenVM that knows only the generator
  has the least prompt-boundary MRE on the training groups ({(prompt, generator): [lengths]},
  prompt_groups.group_by_prompt).

  Such a LenVM's V(s_0) is the generator's mean return, so its L_hat is the log-mean of gamma ** L: a certainty
  equivalent that lies further below the mean length as gamma falls. MRE rewards the 1/L-weighted median, which lies
  below the mean for right-skewed lengths, so the p99 rule ("auto", made for per-token resolution) overshoots it.
  Searched over horizons 1 / (1 - gamma) from 2 tokens to 4x the longest completion, log-spaced.
  """
  if not groups:
    raise ValueError("loss.gamma='auto_mre' needs finished completions in the training split; there are none")
  # Flat arrays so each candidate gamma costs a few numpy passes: lengths in group order, their group and generator.
  generators = sorted({generator for _, generator in groups})
  lengths = np.concatenate([np.asarray(v, np.float64) for v in groups.values()])
  sizes = np.array([len(v) for v in groups.values()])
  group_generator = np.array([generators.index(generator) for _, generator in groups])
  sample_generator = np.repeat(group_generator, sizes)
  sample_group = np.repeat(np.arange(len(sizes)), sizes)

  best = None
  for horizon in np.geomspace(2.0, 4.0 * max(lengths.max(), 2.0), horizons):
    gamma = 1.0 - 1.0 / horizon
    truth = prompt_boundary_lengths(lengths, sample_group, len(sizes), gamma)
    guess = prompt_boundary_lengths(lengths, sample_generator, len(generators), gamma)
    mre = float(np.mean(relative_length_error(guess[group_generator], truth)))
    if best is None or mre < best[1]:
      best = (float(gamma), mre)
  return best


def resolve(run: RunConfig, sample) -> RunConfig:
  """`run` with loss.gamma a number: unchanged if it is one; else from `sample`, trajectories of the training split.

  "auto": gamma = 0.01 ** (1 / L_p99) of the finished completions (docs/method.md §7). "auto_mre": the gamma with the
  least prompt-boundary MRE for a LenVM that knows only the generator (least_mre_gamma), for jobs judged by it.
  loss.length_normalizer = 0 under target_type 'normalized_length' becomes the longest completion in `sample`
  (finished or not: a cut completion's length is the generator's limit, the longest any can be).
  """
  if run.loss.target_type == "normalized_length" and not run.loss.length_normalizer:
    longest = max((len(t.completion_ids) for t in sample), default=0)
    if not longest:
      raise ConfigError("config.loss.length_normalizer: 0 (the longest training completion) found no completion "
                        "tokens in the training split; set a length")
    logging.info("loss.length_normalizer=0: the longest of %d training completions has %d tokens", len(sample),
                 longest)
    run = dataclasses.replace(run, loss=dataclasses.replace(run.loss, length_normalizer=float(longest)))
  mode = run.loss.gamma
  if run.loss.gamma_resolved:
    return run
  if mode == "auto_mre":
    gamma, mre = least_mre_gamma(prompt_groups.group_by_prompt(sample))
    logging.info("loss.gamma=auto_mre: least training prompt-boundary MRE %.4f over %d completions -> gamma=%.6f",
                 mre, len(sample), gamma)
    return run.with_gamma(gamma)
  summary = stats.trajectory_stats(sample)["overall"]
  if summary["count"] == 0:
    raise ConfigError("config.loss.gamma: 'auto' needs finished completions in the training split; there are none "
                      "(set a number, or data.unfinished='as_finished')")
  gamma = p99_gamma(summary["p99"])
  logging.info("loss.gamma=auto: L_p99=%.0f over %d completions -> gamma=%.6f", summary["p99"], summary["count"],
               gamma)
  return run.with_gamma(gamma)
