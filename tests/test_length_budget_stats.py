"""The uncertainty evaluate_budget prints beside its accuracies: Wilson intervals and the exact paired test."""

import math

import numpy as np
import pytest

from lenvm_jax.evaluation.budget import paired_test, wilson_interval


def test_wilson_interval_matches_known_values_and_stays_inside_zero_one():
  low, high = wilson_interval(5, 10)
  assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
  low, high = wilson_interval(0, 10)  # The normal approximation would give [0, 0]; Wilson does not.
  assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
  assert wilson_interval(44, 44) == pytest.approx((0.9197, 1.0), abs=1e-4)
  for k in range(0, 31):  # The interval always holds the observed share.
    low, high = wilson_interval(k, 30)
    assert 0.0 <= low <= k / 30 <= high <= 1.0


def test_paired_test_counts_only_the_problems_that_disagree():
  a = np.asarray([1] * 9 + [0] * 1 + [1] * 20 + [0] * 14, bool)  # 9 only a, 1 only b, 20 both, 14 neither.
  b = np.asarray([0] * 9 + [1] * 1 + [1] * 20 + [0] * 14, bool)
  result = paired_test(a, b)
  assert (result["only_this"], result["only_other"]) == (9, 1)
  assert result["p_value"] == pytest.approx(2 * (1 + 10) / 2**10)
  assert paired_test(b, a)["p_value"] == result["p_value"]
  assert paired_test(a, a)["p_value"] == 1.0  # No disagreement, no evidence.
  # 6 vs 2 looks like a gain but is a coin flip's worth: p = 0.289.
  six_two = paired_test([1] * 6 + [0] * 2, [0] * 6 + [1] * 2)["p_value"]
  assert six_two == pytest.approx(2 * sum(math.comb(8, i) for i in range(3)) / 256) and six_two > 0.25
