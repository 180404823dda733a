"""LIFEBench length-instruction scores (docs/method.md §11): how well an output length follows a length instruction.

Deviation d = (L_out - L_target) / L_target. Equal To scores 100 * exp(5 d) when too short (d < 0) and
100 * exp(-2 d) when too long (d > 0): falling short is punished harder. At Most scores 100 whenever d <= 0 and
At Least whenever d >= 0; on the wrong side they score like Equal To.
"""

import numpy as np

EQUAL_TO, AT_LEAST, AT_MOST = "equal_to", "at_least", "at_most"
RULES = (EQUAL_TO, AT_LEAST, AT_MOST)


def length_deviation(output_lengths, target_lengths) -> np.ndarray:
  """d = (L_out - L_target) / L_target, elementwise."""
  target = np.asarray(target_lengths, np.float64)
  if np.any(target <= 0):
    raise ValueError(f"length targets must be positive, got {target[target <= 0][:5].tolist()}")
  return (np.asarray(output_lengths, np.float64) - target) / target


def length_score(output_lengths, target_lengths, rule: str) -> np.ndarray:
  """LIFEBench score in [0, 100] per output for one rule."""
  if rule not in RULES:
    raise ValueError(f"length rule must be one of {RULES}, got {rule!r}")
  d = length_deviation(output_lengths, target_lengths)
  # The exponent is clipped at 0 per branch so the unused branch of np.where never overflows.
  score = np.where(d < 0, 100.0 * np.exp(5.0 * np.minimum(d, 0.0)), 100.0 * np.exp(-2.0 * np.maximum(d, 0.0)))
  if rule == AT_MOST:
    score = np.where(d <= 0, 100.0, score)
  elif rule == AT_LEAST:
    score = np.where(d >= 0, 100.0, score)
  return score


def summarize(output_lengths, target_lengths, rule: str) -> dict:
  """Mean score and mean / mean-absolute deviation of a set of outputs (the numbers LIFEBench tables report)."""
  d = length_deviation(output_lengths, target_lengths)
  return {"score": float(np.mean(length_score(output_lengths, target_lengths, rule))),
          "deviation": float(np.mean(d)), "abs_deviation": float(np.mean(np.abs(d))), "count": int(d.size)}


def length_summary(output_lengths, finished) -> dict:
  """What a user gets beside a score: mean length, and the shares of empty answers (EOS first: nothing before it)
  and of answers cut at the sampler's limit (no EOS). A rule that scores 100 by ending at once or never shows here."""
  lengths = np.asarray(output_lengths, np.int64)
  finished = np.asarray(finished, bool)
  return {"mean_length": float(lengths.mean()), "empty": float(np.mean(finished & (lengths <= 1))),
          "cut": float(np.mean(~finished))}
