"""Scoring answers under a hard token budget (experiments/evaluate_budget.py, the paper's Fig. 2): which problems are
held out, and accuracy / ended share / mean length of completions cut at the budget."""

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
  correct = np.asarray([bool(e) and p.answer.is_correct(t) for e, t, p in zip(ended, texts, prompts)])
  return {"accuracy": float(correct.mean()), "correct": int(correct.sum()), "ended": float(ended.mean()),
          "mean_length": float(lengths.mean())}
