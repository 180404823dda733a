import json
import subprocess
import sys

import numpy as np
import pytest

from lenvm_jax.data import arrayrecord, prompt_groups
from lenvm_jax.data.records import Trajectory
from lenvm_jax.evaluation import headroom, length_eval, prompt_boundary
from lenvm_jax.value import gamma as gamma_lib, targets
from tests.helpers import REPO


def _t(length, generator="a", prompt=(5,), prompt_id=None):
  return Trajectory(np.asarray(prompt, np.int32), np.ones(length, np.int32), True, prompt_id, generator)


def test_prompt_boundary_length_is_the_length_of_the_mean_return():
  assert targets.prompt_boundary_length([37], 0.99) == pytest.approx(37)
  gamma = 0.9
  got = targets.prompt_boundary_length([2, 10], gamma)
  assert 1 - gamma**got == pytest.approx(((1 - gamma**2) + (1 - gamma**10)) / 2)


def test_prompt_boundary_length_of_long_completions_does_not_underflow():
  # gamma ** 50000 underflows to 0 in float64; the log-space sum keeps the exact value.
  gamma = 0.99
  expected = 50_000 + np.log((1 + gamma**1000) / 2) / np.log(gamma)
  assert targets.prompt_boundary_length([50_000, 51_000], gamma) == pytest.approx(expected, rel=1e-12)


def test_least_mre_gamma_makes_the_generator_mean_return_the_least_mre_length():
  rng = np.random.default_rng(0)
  # Two generators, right-skewed lengths; prompts with 1 to 3 samples (L_GT then depends on gamma too).
  train = []
  for i in range(400):
    generator, scale = ("a", 300.0) if i % 2 else ("b", 80.0)
    for _ in range(1 + i % 3):
      train.append(_t(int(rng.lognormal(np.log(scale), 0.6)) + 1, generator, prompt_id=f"p{i}"))
  gamma, mre = gamma_lib.least_mre_gamma(prompt_groups.group_by_prompt(train))
  # The vectorised search agrees with the metric's own definition at the gamma it picked.
  groups = prompt_groups.group_by_prompt(train)
  pooled = {g: [n for (_, gen), ns in groups.items() if gen == g for n in ns] for g in "ab"}
  guess = {g: targets.prompt_boundary_length(v, gamma) for g, v in pooled.items()}
  assert mre == pytest.approx(prompt_boundary.prompt_boundary_mre(groups, lambda k: guess[k[1]], gamma)["*"], rel=1e-9)
  # It is the best gamma: no better at the p99 rule ("auto"), nor at finer gammas nearby.
  for other in (0.01 ** (1 / np.percentile([len(t.completion_ids) for t in train], 99)), gamma * 0.999,
                1 - (1 - gamma) * 0.97, 1 - (1 - gamma) * 1.03):
    other_guess = {g: targets.prompt_boundary_length(v, other) for g, v in pooled.items()}
    assert mre <= prompt_boundary.prompt_boundary_mre(groups, lambda k: other_guess[k[1]], other)["*"] + 1e-3
  # With one sample per prompt, L_GT = L for every gamma: the generator-only prediction can then reach the least-MRE
  # constant of each generator (the 1/L-weighted median), which the p99 gamma misses.
  single = [_t(int(rng.lognormal(np.log(300.0), 0.6)) + 1, "a", prompt_id=f"q{i}") for i in range(500)]
  gamma, mre = gamma_lib.least_mre_gamma(prompt_groups.group_by_prompt(single))
  lengths = np.array([len(t.completion_ids) for t in single], np.float64)
  floor = np.mean(np.abs(prompt_boundary.least_mre_length(lengths) - lengths) / lengths)
  p99_gamma = 0.01 ** (1 / np.percentile(lengths, 99))
  at_p99 = np.mean(np.abs(targets.prompt_boundary_length(lengths, p99_gamma) - lengths) / lengths)
  assert mre == pytest.approx(floor, abs=2e-3) and at_p99 > floor + 0.01
  with pytest.raises(ValueError, match="auto_mre"):
    unfinished = Trajectory(np.ones(2, np.int32), np.ones(3, np.int32), False, "p", "a")
    gamma_lib.least_mre_gamma(prompt_groups.group_by_prompt([unfinished]))


def test_baselines_are_medians_by_position_and_generator():
  train = [_t(4, "a", prompt_id="p"), _t(4, "a", prompt_id="q"), _t(10, "b", prompt_id="p")]
  base = length_eval.fit_baselines(train, gamma=0.9)
  # Remaining lengths: a: 4,3,2,1,0 twice; b: 10..0. Median of all 21 tokens:
  all_remaining = [4, 3, 2, 1, 0] * 2 + list(range(10, -1, -1))
  assert base.constant_remaining == np.median(all_remaining)
  # Generator a at t = 0 (bucket 0): remaining 4; at t = 1, 2 (bucket 1): median of 3, 2, 3, 2 = 2.5.
  np.testing.assert_allclose(base.remaining_by_position("a", np.array([0, 1, 2])), [4, 2.5, 2.5])
  # Unknown generators and unseen buckets fall back to the all-generator table.
  assert base.remaining_by_position("zzz", np.array([0]))[0] == np.median([4, 4, 10])
  # Bucket 3 is t = 7..14: only b reaches it (t = 7..10, remaining 3..0).
  assert base.remaining_by_position("a", np.array([9]))[0] == np.median([3, 2, 1, 0])
  assert base.generator_prompt_length["a"] == pytest.approx(4)
  assert base.generator_prompt_length["b"] == pytest.approx(10)


def test_least_mre_length_minimises_mre_on_its_inputs():
  # Weights 1/2, 1/4, 1/20 (total 0.8): the cumulative weight passes half (0.4) at L = 2.
  assert prompt_boundary.least_mre_length([20, 2, 4]) == 2
  lengths = np.array([3.0, 7, 8, 50, 120, 400])
  mre = lambda c: np.mean(np.abs(c - lengths) / lengths)
  best = prompt_boundary.least_mre_length(lengths)
  assert all(mre(best) <= mre(c) + 1e-12 for c in np.linspace(1, 500, 2000))
  # The prompt-blind baselines are fit this way on the training groups' L_GT.
  train = [_t(n, g, prompt_id=str(n)) for g, ns in (("a", (2, 4, 20)), ("b", (9, 10, 12))) for n in ns]
  base = length_eval.fit_baselines(train, gamma=0.9)
  # b: weights 1/9, 1/10, 1/12 (total 0.294): half is passed at 10. All: 1.094 in all, 0.5 at 2, 0.75 at 4.
  assert base.generator_prompt_length == {"a": pytest.approx(2), "b": pytest.approx(10)}
  assert base.constant_prompt_length == pytest.approx(4)


class _OraclePredictor:
  """Predicts the true remaining length: the model column must then show zero error."""

  def predict(self, trajectories, batch_size, max_len, max_prompt_len):
    out = []
    for t in trajectories:
      n = len(t.completion_ids) - np.arange(min(len(t.completion_ids) + 1, max_len - len(t.prompt_ids) + 1))
      out.append((None, n.astype(np.float64)))
    return out


def test_evaluate_scores_model_and_baselines_on_the_same_states():
  train = [_t(4, "a", prompt_id="p"), _t(10, "b", prompt_id="p")]
  held_out = [_t(6, "a", prompt_id="x"), _t(12, "b", prompt_id="x"), _t(3, "a", prompt_id="y")]
  report = length_eval.evaluate(_OraclePredictor(), held_out, length_eval.fit_baselines(train, 0.9), 0.9,
                                max_len=8)
  assert report["token_mae"]["*"]["model"] == 0.0
  assert report["prompt_mre"]["*"]["model"] == pytest.approx(0.0, abs=1e-12)
  assert report["token_mae"]["*"]["constant"] > 0 and report["prompt_mre"]["a"]["generator"] > 0
  # max_len 8 with a 1-token prompt keeps states s_0..s_7 of the 12-token completion: 7 + 8 + 4 states in all.
  assert report["counts"] == {"trajectories": 3, "prompt_groups": 3, "tokens": 7 + 8 + 4, "eos_states": 2}
  calibration = report["prompt_calibration"]
  assert calibration["a"]["model"] == pytest.approx(calibration["a"]["true"])
  assert calibration["a"]["true"] == pytest.approx(targets.prompt_boundary_length([6, 3], 0.9))


def test_reference_grouping_scores_groups_with_unfinished_samples_from_their_prompt():
  class Oracle(_OraclePredictor):
    def predict_prompts(self, prompts, batch_size=16, max_prompt_len=0):
      return None, np.asarray([{"y": 20.0, "z": 30.0}[t.prompt_id] for t in prompts])

  held_out = [_t(6, "a", prompt_id="x"), _t(8, "a", prompt_id="x"), _t(3, "a", prompt_id="y"),
              Trajectory(np.asarray([5], np.int32), np.ones(9, np.int32), False, "y", "a"),
              Trajectory(np.asarray([5], np.int32), np.ones(9, np.int32), False, "z", "a"),
              Trajectory(np.asarray([5], np.int32), np.ones(7, np.int32), False, "z", "a"), _t(4, "a", prompt_id="w")]
  baselines = length_eval.fit_baselines([_t(4, "a", prompt_id="p")], 0.9)
  ours = length_eval.evaluate(Oracle(), held_out, baselines, 0.9, max_len=64)
  assert ours["counts"]["prompt_groups"] == 3  # x, y (its finished sample), w.
  reference = length_eval.evaluate(Oracle(), held_out, baselines, 0.9, max_len=64, grouping="reference")
  assert reference["counts"]["prompt_groups"] == 3  # x, y and z: two samples each; w has one.
  truth = {"x": targets.prompt_boundary_length([6, 8], 0.9), "y": targets.prompt_boundary_length([3, 9], 0.9),
           "z": targets.prompt_boundary_length([9, 7], 0.9)}
  # L_hat: x's from its finished samples' s_0 (a model's V(s_0) is the same for both; the oracle's differ and the
  # last, 8, is kept), y's from its finished sample (3), z (no finished sample) from its prompt alone (30).
  expected = np.mean([abs(8 - truth["x"]) / truth["x"], abs(3 - truth["y"]) / truth["y"],
                      abs(30 - truth["z"]) / truth["z"]])
  assert reference["prompt_mre"]["*"]["model"] == pytest.approx(expected)
  # Each report carries both definitions side by side, whichever it was asked for; the tables say which is which.
  for report in (ours, reference):
    both = report["prompt_mre_by_grouping"]
    assert both["reference"]["model"] == pytest.approx(expected) and both["reference"]["groups"] == 3
    assert both["finished"]["model"] == pytest.approx(ours["prompt_mre"]["*"]["model"])
    assert both["finished"]["groups"] == 3 and both["finished"]["model"] != both["reference"]["model"]
    printed = length_eval.format_report(report)
    assert "the reference's: every sample" in printed and "ours: finished completions only" in printed


def test_per_token_mre_under_both_definitions_side_by_side():
  """Ours leaves the EOS state out; the reference's counts it as 0 error (its trainer's len_rel_loss) and picks the
  state at f % among the states in the row. Every state is predicted one token too long."""
  class Offset(_OraclePredictor):
    def predict(self, trajectories, **kwargs):
      return [(v, n + 1.0) for v, n in super().predict(trajectories, **kwargs)]

  # A: 4 tokens after a 1-token prompt, whole in max_len 5 (states n = 4..0, EOS included). B: a 3-token prompt, cut
  # to 5 tokens: states n = 4, 3, 2 only (no EOS in the row).
  held_out = [_t(4, "a", prompt=(5,), prompt_id="x"), _t(4, "a", prompt=(5, 6, 7), prompt_id="y")]
  train = [_t(4, "a", prompt_id="p"), _t(10, "a", prompt_id="q")]
  report = length_eval.evaluate(Offset(), held_out, length_eval.fit_baselines(train, 0.9), 0.9, max_len=5)
  errors = (1 / 4 + 1 / 3 + 1 / 2 + 1) + (1 / 4 + 1 / 3 + 1 / 2)
  assert report["counts"]["eos_states"] == 1 and report["counts"]["tokens"] == 8
  assert report["token_mre"]["ours"]["*"]["model"] == pytest.approx(errors / 7)
  assert report["token_mre"]["reference"]["*"]["model"] == pytest.approx(errors / 8)
  # Over the same states the reference's number is ours times the share of non-EOS states, for every column.
  for name in ("model", "constant", "position"):
    assert report["token_mre"]["reference"]["a"][name] == pytest.approx(report["token_mre"]["ours"]["a"][name] * 7 / 8)
  # At 0 / 25 / 50 / 75 %: ours takes t = floor(f L) = 0, 1, 2, 3 (B has no t = 3 in its row); the reference ranks
  # the row's states: A 0, 1, 2, 3, B (3 states) 0, 0, 1, 1.
  ours, reference = report["token_mre_at"]["ours"], report["token_mre_at"]["reference"]
  assert [ours[f]["model"] for f in ("0", "25", "50", "75")] == pytest.approx([1 / 4, 1 / 3, 1 / 2, 1.0])
  assert [reference[f]["model"] for f in ("0", "25", "50", "75")] == pytest.approx(
      [1 / 4, (1 / 3 + 1 / 4) / 2, (1 / 2 + 1 / 3) / 2, (1 + 1 / 3) / 2])
  # The per-token MAE counts every state, EOS too (one definition): 1 token off everywhere.
  assert report["token_mae"]["*"]["model"] == pytest.approx(1.0)
  printed = length_eval.format_report(report)
  assert "ours: EOS left out" in printed and "reference: the reference's: EOS counted as 0 error" in printed
  lines = printed.splitlines()
  row = lambda label, definition: next(line.split() for line in lines
                                       if line.split()[:2] == [label, definition])
  assert float(row("all", "ours")[2]) == pytest.approx(errors / 7, rel=1e-3)
  assert float(row("all", "reference")[2]) == pytest.approx(errors / 8, rel=1e-3)
  assert float(row("25%", "reference")[2]) == pytest.approx(7 / 24, rel=1e-3)
  with pytest.raises(ValueError, match="definition"):
    length_eval.token_relative_errors([1.0], [1.0], "paper")


def test_prompt_calibration_shows_a_biased_boundary_value():
  class Doubling(_OraclePredictor):  # Predicts twice the true remaining length at every state.
    def predict(self, trajectories, **kwargs):
      return [(v, 2 * n) for v, n in super().predict(trajectories, **kwargs)]

  held_out = [_t(6, "a", prompt_id="x"), _t(12, "b", prompt_id="x"), _t(3, "a", prompt_id="y")]
  train = [_t(4, "a", prompt_id="p"), _t(10, "b", prompt_id="p")]
  report = length_eval.evaluate(Doubling(), held_out, length_eval.fit_baselines(train, 0.9), 0.9, max_len=8)
  assert report["prompt_calibration"]["a"] == pytest.approx(
      {"model": targets.prompt_boundary_length([12, 6], 0.9),
       "true": targets.prompt_boundary_length([6, 3], 0.9)})
  assert report["prompt_calibration"]["*"]["model"] == pytest.approx(
      targets.prompt_boundary_length([12, 24, 6], 0.9))


def test_cell_mean_mre_removes_the_prompt_specific_part_of_the_boundary_prediction():
  class Scattered(_OraclePredictor):  # L_hat at s_0 off by +-50 % around the truth, alternating over prompts.
    def predict(self, trajectories, **kwargs):
      out = super().predict(trajectories, **kwargs)
      return [(v, np.concatenate([[n[0] * (1.5 if i % 2 else 0.5)], n[1:]])) for i, (v, n) in enumerate(out)]

  gamma = 0.9
  # Cell "a|s" of generator a holds two prompts of 6 tokens each: their cell mean is exact, the scattered model not.
  held_out = [_t(6, "a", prompt_id="p1|s"), _t(6, "a", prompt_id="p2|s"), _t(12, "b", prompt_id="p1|s")]
  train = [_t(4, "a", prompt_id="p|s"), _t(10, "b", prompt_id="p|s")]
  cell_of = lambda key: prompt_groups.cell_of(key, "|")
  report = length_eval.evaluate(Scattered(), held_out, length_eval.fit_baselines(train, gamma), gamma, max_len=16,
                                cell_of=cell_of)
  mre = report["prompt_mre"]
  assert mre["a"]["model"] == pytest.approx(0.5)
  assert mre["a"]["cell_mean"] == pytest.approx(abs(targets.prompt_boundary_length([3, 9], gamma) - 6) / 6)
  assert mre["b"]["cell_mean"] == pytest.approx(mre["b"]["model"]) == pytest.approx(0.5)  # A cell of one prompt.
  assert cell_of(("p1|s|t", "a")) == ("a", "s|t") and cell_of(("p1", "a")) == ("a", "")
  plain = length_eval.evaluate(Scattered(), held_out, length_eval.fit_baselines(train, gamma), gamma, max_len=16)
  assert "cell_mean" not in plain["prompt_mre"]["*"]

  # evaluate_lengths prints the cell-mean column only when the report has it.
  for printed, columns in ((length_eval.format_report(report), ("model", "constant", "generator", "cell_mean")),
                           (length_eval.format_report(plain), ("model", "constant", "generator"))):
    lines = printed.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("prompt-boundary MRE")))
    assert lines[header].endswith(" / model's cell mean") == (len(columns) == 4)
    row_a = next(line for line in lines[header + 1:] if line.split()[0] == "a").split()
    source = report if len(columns) == 4 else plain
    assert [float(v) for v in row_a[1:]] == pytest.approx(
        [source["prompt_mre"]["a"][c] for c in columns], rel=1e-3)


def test_evaluate_lengths_summary_says_which_baselines_each_run_beats():
  report = lambda mre, mae: {"prompt_mre": {"*": {"model": mre, "constant": 0.2}},
                             "token_mae": {"*": {"model": mae, "position": 30.0}}}
  reports = {"runs/pretrained": report(0.1, 25.0), "runs/random": report(0.3, 35.0)}
  lines = length_eval.format_summary(reports).splitlines()
  assert lines[1].split() == ["runs/pretrained", "0.1000", "0.2000", "True", "25.000", "30.000", "True"]
  assert lines[2].split() == ["runs/random", "0.3000", "0.2000", "False", "35.000", "30.000", "False"]


def test_prompt_boundary_mre_by_hand():
  gamma = 0.5
  # Group p/a: lengths 1 and 3: mean return ((1 - 0.5) + (1 - 0.125)) / 2 = 0.6875, L_GT = log2(1 / 0.3125).
  truth_p = np.log(0.3125) / np.log(0.5)
  groups = {("p", "a"): [1, 3], ("q", "a"): [4], ("q", "b"): [2]}
  predicted = {("p", "a"): truth_p * 1.5, ("q", "a"): 3.0, ("q", "b"): 2.0}
  mre = prompt_boundary.prompt_boundary_mre(groups, predicted, gamma)
  assert mre["a"] == pytest.approx((0.5 + 0.25) / 2)
  assert mre["b"] == pytest.approx(0.0)
  assert mre["*"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)
  # L_GT under one token divides by 1: a prompt answered by EOS alone.
  assert prompt_boundary.prompt_boundary_mre({("r", "a"): [0]}, {("r", "a"): 2.0}, gamma)["*"] == pytest.approx(2.0)


def test_cell_headroom_scores_exact_cell_and_generator_lenvms_against_the_constant():
  gamma = 0.99
  # Setting "a" always takes 100 tokens, "b" 400: a LenVM that knows the setting is exact; the generator's pooled
  # certainty equivalent and its 1/L-weighted median (100) are not.
  groups = {(f"p{i}|{s}", "g"): [length] for i in range(10) for s, length in (("a", 100), ("b", 400))}
  problem_of = lambda key: key[0].split("|")[0]
  setting_of = lambda key: (key[1], key[0].split("|")[1])
  by_setting = headroom.cell_headroom(groups, problem_of, setting_of, gamma, splits=5)
  pooled = targets.prompt_boundary_length([100, 400], gamma)
  assert by_setting["cell"] == 0.0 and by_setting["cell_wins"] == 1.0
  assert by_setting["constant"] == pytest.approx((0.0 + 300 / 400) / 2)
  assert by_setting["generator"] == pytest.approx((abs(pooled - 100) / 100 + abs(pooled - 400) / 400) / 2)
  # Cells that tell nothing (one per generator) make the cell LenVM the generator LenVM.
  blind = headroom.cell_headroom(groups, problem_of, lambda key: key[1], gamma, splits=5)
  assert blind["cell"] == pytest.approx(blind["generator"]) and blind["cell_wins"] == 0.0


def test_mre_headroom_prints_the_exact_cell_and_constant_scores(tmp_path):
  """The CLI end to end: cells read from the prompt_id after the separator, the table row for each gamma."""
  records = [arrayrecord.encode(Trajectory(np.array([1, 2], np.int32), np.full(length, 5, np.int32), True,
                                           f"p{i}|{setting}", "g"))
             for i in range(10) for setting, length in (("a", 100), ("b", 400))]
  arrayrecord.write_shard(arrayrecord.shard_path(str(tmp_path), "train", 0, 1), records)
  printed = subprocess.run([sys.executable, "-m", "experiments.mre_headroom", f"--data_dir={tmp_path}",
                            "--gammas=0.99", "--splits=5"], capture_output=True, text=True, check=True).stdout
  row = printed.strip().splitlines()[-1].split()
  pooled = targets.prompt_boundary_length([100, 400], 0.99)
  assert printed.startswith("20 training prompt groups")
  assert row[0] == "0.99" and float(row[1]) == 0.0 and row[-1] == "100%"  # Knowing the setting is exact here.
  assert float(row[2]) == pytest.approx((abs(pooled - 100) / 100 + abs(pooled - 400) / 400) / 2, abs=1e-4)
  assert float(row[3]) == pytest.approx(0.375, abs=1e-4)


@pytest.mark.slow
def test_evaluate_lengths_ours_is_the_trainers_metric_and_the_reference_counts_eos_as_zero(tmp_path):
  """On a trained run: the per-token MRE evaluate_lengths labels "ours" is the trainer's eval length_mre (and its
  per-position values), computed by another code path (Predictor over whole sequences, not packed eval rows); the
  reference's is ours times the share of non-EOS states."""
  workdir = tmp_path / "run"
  subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
                  f"--workdir={workdir}"], cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
  printed = subprocess.run([sys.executable, "-m", "experiments.evaluate_lengths", f"--workdir={workdir}"], cwd=REPO,
                           check=True, capture_output=True, text=True, timeout=600).stdout
  report = json.loads((workdir / "length_eval.json").read_text())
  final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if '"split": "eval"' in line][-1]
  ours, reference = report["token_mre"]["ours"]["*"], report["token_mre"]["reference"]["*"]
  assert ours["model"] == pytest.approx(final["length_mre"], rel=1e-3)
  assert report["token_mae"]["*"]["model"] == pytest.approx(final["length_mae"], rel=1e-3)
  for f in ("0", "25", "50", "75"):
    assert report["token_mre_at"]["ours"][f]["model"] == pytest.approx(final[f"length_mre_at_{f}"], rel=1e-3)
  counts = report["counts"]
  assert 0 < counts["eos_states"] <= counts["trajectories"]
  non_eos = (counts["tokens"] - counts["eos_states"]) / counts["tokens"]
  assert reference["model"] == pytest.approx(ours["model"] * non_eos, rel=1e-9)
  assert "per-token length MRE under both definitions" in printed
