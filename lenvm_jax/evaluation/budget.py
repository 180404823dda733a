"""Scoring answers under a hard token budget (experiments/evaluate_budget.py, the paper's Fig. 2): which problems are
held out, and accuracy / ended share / mean length of completions cut at the budget."""

import math

import numpy as np

from lenvm_jax.data.prompt_groups import split_groups


def held_out(prompts, split: str, eval_fraction: float):
  """The prompts experiments.generate put in `split`: its rule (prompt_groups.split_groups, by prompt id) unless a
  prompt names its split."""
  drawn = split_groups({p.prompt_id for p in prompts if not p.split}, eval_fraction)
  return [p for p in prompts if (p.split or drawn[p.prompt_id]) == split]


def score(samples, texts, prompts, budget: int) -> dict:
  """Accuracy (ended within the budget and the prompt's checker accepts the text), share ended, and mean length
  (tokens, cut at the budget). samples have completion_ids and finished; texts are their decoded completions."""
  lengths = np.asarray([min(len(s.completion_ids), budget) for s in samples])
  ended = np.asarray([s.finished and len(s.completion_ids) <= budget for s in samples])
  correct = correct_flags(samples, texts, prompts, budget)
  return {"accuracy": float(correct.mean()), "correct": int(correct.sum()), "ended": float(ended.mean()),
          "mean_length": float(lengths.mean())}


def correct_flags(samples, texts, prompts, budget: int) -> np.ndarray:
  """[N] bool: ended within the budget and accepted by the prompt's checker (the per-problem outcome of `score`)."""
  ended = [s.finished and len(s.completion_ids) <= budget for s in samples]
  return np.asarray([bool(e) and p.answer.is_correct(t) for e, t, p in zip(ended, texts, prompts)], bool)


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
  """The Wilson score interval of a proportion (95 % by default): honest at small n and near 0 or 1, where the
  normal approximation's p +- z sqrt(p (1 - p) / n) collapses to a point."""
  if trials <= 0:
    return 0.0, 1.0
  p = successes / trials
  centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
  return max(0.0, centre - half), min(1.0, centre + half)


def paired_test(correct_a, correct_b) -> dict:
  """Exact McNemar test of two decodings on the same problems: only the problems one gets right and the other
  wrong say which is better; under no difference each such split is a fair coin. Two-sided p-value."""
  a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n, k = only_a + only_b, min(only_a, only_b)
  p = min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n) if n else 1.0
  return {"only_this": only_a, "only_other": only_b, "p_value": p}
