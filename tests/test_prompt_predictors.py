"""Prompt-only baselines (task, within-task features) and bootstrap intervals over problems (issue 32)."""

import numpy as np
import pytest

from lenvm_jax.data.records import Trajectory
from lenvm_jax.evaluation import bootstrap, length_eval, prompt_features
from lenvm_jax.evaluation.prompt_boundary import prompt_boundary_mre


def test_features_read_tokens_numbers_digits_magnitude_and_words():
  f = prompt_features.prompt_features([1] * 7, "Add 12 and 3.5 then 400 please")
  assert f.tolist() == [7, 3, 2 + 2 + 3, pytest.approx(np.log10(401)), 7]
  assert prompt_features.prompt_features([1, 2]).tolist() == [2, 0, 0, 0, 0]


def test_task_is_the_id_before_options_seed_or_setting():
  assert prompt_features.task_of("chain_sum{max_digits=1}/0/17") == "chain_sum"
  assert prompt_features.task_of("gcd/0/3") == "gcd"
  assert prompt_features.task_of("problem12|cot") == "problem12"
  assert prompt_features.task_of((5, 6, 7)) == ""


def test_least_mre_scale_is_the_minimiser():
  rng = np.random.default_rng(0)
  predicted, true = rng.uniform(5, 50, 41), rng.uniform(5, 80, 41)
  mre = lambda s: np.mean(np.abs(s * predicted - true) / true)
  best = prompt_features.least_mre_scale(predicted, true)
  grid = np.linspace(0.05, 10, 20001)
  assert mre(best) <= min(mre(s) for s in grid) + 1e-12


def _groups(rng, count):
  """Task "sum": L_GT = 8 x (numbers in the prompt); task "echo": about 30 whatever the prompt says."""
  truths, features = {}, {}
  for i in range(count):
    numbers = int(rng.integers(1, 9))
    text = " ".join(str(rng.integers(0, 99)) for _ in range(numbers))
    key = (f"sum/0/{i}", "g")
    truths[key], features[key] = 8.0 * numbers, prompt_features.prompt_features([1] * 10, text)
    key = (f"echo/0/{i}", "g")
    truths[key] = float(rng.uniform(27, 33))
    features[key] = prompt_features.prompt_features([1] * 10, "say " + text)
  return truths, features


def test_the_feature_fit_reads_what_the_task_alone_cannot():
  rng = np.random.default_rng(1)
  train, train_features = _groups(rng, 60)
  held_out, held_features = _groups(rng, 40)
  predictors = prompt_features.fit_prompt_predictors(train, train_features)
  groups = {key: [truth] for key, truth in held_out.items()}  # One sample: L_GT is the length itself.
  task = prompt_boundary_mre(groups, predictors.task, 0.99)["*"]
  features = prompt_boundary_mre(groups, lambda key: predictors.features(key, held_features[key]), 0.99)["*"]
  constant = prompt_boundary_mre(groups, lambda key: predictors.constant, 0.99)["*"]
  assert features < 0.06 < task < constant  # "sum" lengths follow the number count; only the features see it.
  assert predictors.task(("echo/1/5", "g")) == pytest.approx(30, abs=3)
  assert predictors.task(("unseen/0/0", "g")) == predictors.constant
  assert "sum" in predictors.describe() and "+ features" in predictors.describe()


def test_a_task_with_too_few_groups_falls_back_to_its_constant():
  truths = {(f"t/0/{i}", "g"): float(10 + i) for i in range(5)}
  features = {key: np.asarray([i, i, 0, 0, 0], float) for i, key in enumerate(truths)}
  predictors = prompt_features.fit_prompt_predictors(truths, features)
  key = next(iter(truths))
  assert predictors.features(key, np.asarray([100.0, 100, 0, 0, 0])) == predictors.task(key)


def test_bootstrap_interval_covers_a_known_mean_and_pairs_differences():
  rng = np.random.default_rng(2)
  units = 400
  base = rng.normal(1.0, 0.5, units)
  result = bootstrap.ratio_intervals({"a": base, "b": base + 0.05}, np.ones(units), "a", seed=3)
  lo, hi = result["interval"]["a"]
  half_width = 1.96 * 0.5 / np.sqrt(units)
  assert lo < base.mean() < hi and (hi - lo) / 2 == pytest.approx(half_width, rel=0.15)
  # b is worse by exactly 0.05 on every unit: its paired difference is 0.05 in every resample, though the two
  # intervals overlap.
  assert result["minus_reference"]["b"] == pytest.approx([0.05, 0.05])
  assert result["interval"]["b"][0] < hi


def test_samples_of_one_problem_are_resampled_together():
  """Eight identical samples per problem carry no more information than one: the interval must not narrow."""
  rng = np.random.default_rng(4)
  errors = rng.exponential(1.0, 50)
  one = bootstrap.per_unit_sums([f"p{i}" for i in range(50)], {"m": [(e, 1) for e in errors]})
  eight = bootstrap.per_unit_sums([f"p{i}" for i in range(50) for _ in range(8)],
                                  {"m": [(e, 1) for e in errors for _ in range(8)]})
  intervals = [bootstrap.ratio_intervals(sums, counts, "m", seed=0)["interval"]["m"] for _, sums, counts in (one, eight)]
  assert intervals[0] == pytest.approx(intervals[1])


class _Oracle:
  def predict(self, trajectories, batch_size, max_len, max_prompt_len):
    return [(None, (len(t.completion_ids) - np.arange(len(t.completion_ids) + 1)).astype(np.float64))
            for t in trajectories]


def test_evaluate_reports_every_prompt_predictor_with_intervals():
  rng = np.random.default_rng(5)

  def records(split, count):
    out = []
    for i in range(count):
      digits = int(rng.integers(1, 6))
      prompt = np.asarray([7] * digits + [3], np.int32)  # The describer spells one number per 7.
      length = 10 * digits + int(rng.integers(0, 2))  # The samples of a problem agree: the oracle's V(s_0) is exact.
      out.extend(Trajectory(prompt, np.ones(length, np.int32), True, f"count/{split}/{i}", "g") for _ in range(3))
    return out

  describe = lambda ids: " ".join("12" for token in ids if token == 7)
  train, held_out = records("train", 40), records("eval", 30)
  baselines = length_eval.fit_baselines(train, 0.95, describe)
  report = length_eval.evaluate(_Oracle(), held_out, baselines, 0.95, max_len=128, describe=describe)
  mre, intervals = report["prompt_mre"]["*"], report["intervals"]
  assert mre["model"] == pytest.approx(0, abs=1e-9) and mre["features"] < 0.05 < mre["task"]
  assert intervals["prompt_mre"]["problems"] == 30 and intervals["token_mae"]["problems"] == 30
  assert intervals["prompt_mre"]["interval"]["model"] == pytest.approx([0, 0], abs=1e-9)
  assert intervals["prompt_mre"]["minus_reference"]["constant"][0] > 0  # The oracle beats the constant.
  assert intervals["token_mae"]["minus_reference"]["position"][0] > 0
  text = length_eval.format_report(report)
  assert "features" in text and "minus model" in text
  assert "prompt-boundary MRE with bootstrap" in length_eval.format_summary({"run": report})
