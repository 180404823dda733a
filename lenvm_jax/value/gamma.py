"""The discount gamma: the rules that pick it from completion lengths, and the resolution of loss.gamma.

A run whose config says loss.gamma = "auto" or "auto_mre" gets a number from its training split once, at the start
(`resolve`), before anything is built; the resolved RunConfig is what config.json records and what prediction,
export and evaluation later read.
"""

import logging

from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import prompt_groups, stats
from lenvm_jax.evaluation import prompt_boundary


def resolve(run: RunConfig, sample) -> RunConfig:
  """`run` with loss.gamma a number: unchanged if it is one; else from `sample`, trajectories of the training split.

  "auto": gamma = 0.01 ** (1 / L_p99) of the finished completions (spec section 1). "auto_mre": the gamma with the
  least prompt-boundary MRE for a LenVM that knows only the generator (least_mre_gamma), for jobs judged by it.
  """
  mode = run.loss.gamma
  if run.loss.gamma_resolved:
    return run
  if mode == "auto_mre":
    gamma, mre = prompt_boundary.least_mre_gamma(prompt_groups.group_by_prompt(sample))
    logging.info("loss.gamma=auto_mre: least training prompt-boundary MRE %.4f over %d completions -> gamma=%.6f",
                 mre, len(sample), gamma)
    return run.with_gamma(gamma)
  summary = stats.trajectory_stats(sample)["overall"]
  if summary["count"] == 0:
    raise ConfigError("config.loss.gamma: 'auto' needs finished completions in the training split; there are none "
                      "(set a number, or data.unfinished='as_finished')")
  gamma = stats.suggested_gamma(summary["p99"])
  logging.info("loss.gamma=auto: L_p99=%.0f over %d completions -> gamma=%.6f", summary["p99"], summary["count"],
               gamma)
  return run.with_gamma(gamma)
