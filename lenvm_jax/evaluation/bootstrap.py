"""Bootstrap intervals over problems for the held-out length metrics, and paired intervals of their differences.

The unit resampled is the problem, not the token or the sample: the samples of one problem share its difficulty, so
resampling them as if independent would give intervals far too narrow. Every metric here is a ratio of per-problem
sums (per-token MAE: summed absolute errors over token counts; prompt-boundary MRE: summed group errors over group
counts), and all predictors are resampled with the same draws, so a difference between two of them gets a paired
interval (narrower than comparing their two intervals, which is the stricter reading this module also gives).
"""

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def resample_weights(units: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
  """[resamples, units] how often each unit is drawn in each resample (draws with replacement, units at a time)."""
  if units <= 0:
    raise ValueError("a bootstrap needs at least one problem")
  return np.random.default_rng(seed).multinomial(units, np.full(units, 1.0 / units), size=resamples)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
  tail = (1.0 - level) / 2 * 100
  return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def ratio_intervals(sums: dict, counts, reference: str, resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> dict:
  """sums {predictor: [units] summed errors} and counts [units] -> {"interval": {predictor: [lo, hi]} of
  sum / count, "minus_reference": {predictor: [lo, hi]} of predictor's metric minus `reference`'s, paired}. A
  difference interval above 0 says the reference is better on these problems at this level."""
  counts = np.asarray(counts, np.float64)
  weights = resample_weights(len(counts), resamples, seed).astype(np.float64)
  total = weights @ counts
  drawn = {name: weights @ np.asarray(values, np.float64) / total for name, values in sums.items()}
  return {"interval": {name: percentile_interval(v, level) for name, v in drawn.items()},
          "minus_reference": {name: percentile_interval(v - drawn[reference], level)
                              for name, v in drawn.items() if name != reference}}


def per_unit_sums(unit_of_item: list, values: dict) -> tuple[list, dict, np.ndarray]:
  """Items (each with a unit and, per predictor, a summed error and a count) -> (units, {predictor: [units] sums},
  [units] counts). values: {predictor: [(sum, count) per item]} in the order of unit_of_item."""
  units = sorted(set(unit_of_item), key=str)
  index = {u: i for i, u in enumerate(units)}
  rows = np.asarray([index[u] for u in unit_of_item], np.int64)
  counts, sums = None, {}
  for name, pairs in values.items():
    pairs = np.asarray(pairs, np.float64).reshape(-1, 2)
    sums[name] = np.bincount(rows, pairs[:, 0], len(units))
    counts = np.bincount(rows, pairs[:, 1], len(units)) if counts is None else counts
  return units, sums, counts


def format_interval(interval) -> str:
  return f"[{interval[0]:.4g}, {interval[1]:.4g}]"
