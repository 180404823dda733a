"""Prompt-only length predictors for the prompt boundary: what knowing the task, or the task and a few surface
features of the prompt, gets without a LenVM.

A LenVM that beats the least-MRE constant may only be recognising the task (experiments/smollm2_gsm/README.md,
job 1b). These two baselines tell how much more it reads: `task` predicts the least-MRE length of the prompt's task
on the training groups; `features` fits, within each task, L_GT linearly on a few numbers anyone can read off the
prompt (its token count and, given its text, how many numbers it holds, their digits, the largest one's magnitude and
its words) by least relative squares, then scales the fit to least MRE on the same training groups. Both are numpy only and fit on training groups
({(prompt, generator): L_GT}, lenvm_jax/data/prompt_groups.py), so they are scored on held-out groups exactly as the
model and the constant are.
"""

import dataclasses
import re

import numpy as np

from lenvm_jax.evaluation.prompt_boundary import least_mre_length

# Reasoning-gym prompt ids are TASK{options}/seed/index, CHAMP's problem|setting: the task is what comes first.
_TASK_END = re.compile(r"[/{|]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
FEATURE_NAMES = ("prompt tokens", "numbers", "digits", "log10 largest number", "words")
# A task's feature fit needs this many training groups per coefficient; a task with fewer gets its least-MRE length.
GROUPS_PER_COEFFICIENT = 4
RIDGE = 1e-2  # On standardised features: keeps a feature that is constant within a task from blowing up.


def task_of(prompt) -> str:
  """The task of a prompt key: its id up to the first '/', '{' or '|'; prompts known only by tokens share one task."""
  return _TASK_END.split(prompt, maxsplit=1)[0] if isinstance(prompt, str) else ""


def prompt_features(prompt_ids, text: str | None = None) -> np.ndarray:
  """FEATURE_NAMES of one prompt; without its text only the token count is known (the rest are 0)."""
  if text is None:
    return np.asarray([len(prompt_ids), 0, 0, 0, 0], np.float64)
  numbers = _NUMBER.findall(text)
  largest = max((float(n) for n in numbers), default=0.0)
  return np.asarray([len(prompt_ids), len(numbers), sum(len(n.replace(".", "")) for n in numbers),
                     np.log10(1.0 + largest), len(text.split())], np.float64)


def least_mre_scale(predicted, true) -> float:
  """The factor s minimising mean |s p - L| / L: the median of L / p weighted by p / L."""
  predicted, true = np.asarray(predicted, np.float64), np.maximum(np.asarray(true, np.float64), 1.0)
  ratios, weights = true / predicted, predicted / true
  order = np.argsort(ratios)
  cumulative = np.cumsum(weights[order])
  return float(ratios[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


@dataclasses.dataclass(frozen=True)
class _TaskFit:
  constant: float  # The task's least-MRE length: the task-only prediction, and the features' fallback.
  mean: np.ndarray | None = None  # Feature standardisation, ridge coefficients (intercept first) and MRE scale.
  scale: np.ndarray | None = None
  coefficients: np.ndarray | None = None
  factor: float = 1.0

  def features_length(self, features: np.ndarray) -> float:
    if self.coefficients is None:
      return self.constant
    z = (features - self.mean) / self.scale
    return float(self.factor * max(self.coefficients[0] + z @ self.coefficients[1:], 1.0))


@dataclasses.dataclass(frozen=True)
class PromptPredictors:
  """Fitted on training groups; `task(key)` and `features(key, vector)` give L_hat for a group key."""
  by_task: dict
  constant: float  # For a task never seen in training.

  def task(self, key) -> float:
    fit = self.by_task.get(task_of(key[0]))
    return fit.constant if fit else self.constant

  def features(self, key, features: np.ndarray) -> float:
    fit = self.by_task.get(task_of(key[0]))
    return fit.features_length(features) if fit else self.constant

  def describe(self) -> str:
    """One line per task: its groups' least-MRE length and whether the feature fit was used."""
    return "; ".join(f"{task or '(tokens)'} {fit.constant:.1f}{'' if fit.coefficients is None else ' + features'}"
                     for task, fit in sorted(self.by_task.items()))


def _fit_task(truths: np.ndarray, features: np.ndarray) -> _TaskFit:
  constant = least_mre_length(truths)
  varying = features.std(axis=0) > 0
  if not varying.any() or len(truths) < GROUPS_PER_COEFFICIENT * (1 + varying.sum()):
    return _TaskFit(constant)
  mean, scale = features.mean(axis=0), np.where(varying, features.std(axis=0), 1.0)
  design = np.concatenate([np.ones((len(truths), 1)), (features - mean) / scale], axis=1)
  # Relative squared error: each row weighted by 1 / L_GT^2, the ridge scaled to the same weights.
  target = np.maximum(truths, 1.0)
  weights = 1.0 / target**2
  penalty = RIDGE * weights.sum() * np.diag([0.0] + [1.0] * features.shape[1])
  coefficients = np.linalg.solve(design.T @ (design * weights[:, None]) + penalty, design.T @ (weights * target))
  fitted = np.maximum(design @ coefficients, 1.0)
  return _TaskFit(constant, mean, scale, coefficients, least_mre_scale(fitted, truths))


def fit_prompt_predictors(truths: dict, features: dict) -> PromptPredictors:
  """truths {(prompt, generator): L_GT} and features {same key: prompt_features(...)} of the training groups."""
  if not truths:
    raise ValueError("prompt predictors need training groups")
  by_task = {}
  for key in truths:
    by_task.setdefault(task_of(key[0]), []).append(key)
  fits = {task: _fit_task(np.asarray([truths[k] for k in keys]), np.stack([features[k] for k in keys]))
          for task, keys in by_task.items()}
  return PromptPredictors(fits, least_mre_length(list(truths.values())))
