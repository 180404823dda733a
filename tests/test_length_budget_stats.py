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


@pytest.mark.slow
def test_evaluate_budget_with_the_papers_tradeoff_settings_prints_intervals_and_paired_tests(tmp_path):
  """evaluate_budget --settings=paper_tradeoff end to end on a tiny run that is both generator and LenVM."""
  import json
  import os
  import subprocess
  import sys
  from experiments.configs import tiny
  from lenvm_jax.data.tokenizer import load_tokenizer
  from lenvm_jax.train import trainer
  from tests.helpers import REPO, run_config
  from tests.helpers import chatml_tokenizer_dir

  (tmp_path / "tok").mkdir()
  tokenizer = load_tokenizer(chatml_tokenizer_dir(tmp_path / "tok"))
  config = tiny.get_config()
  config.model.vocab_size = tokenizer.vocab_size
  config.mesh.data = 1
  config.train.steps = 2
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(run_config(config), str(workdir))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"hello {i}", "answer": "20", "split": "eval"}) + "\n"
                             for i in range(4)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate_budget", f"--workdir={workdir}", f"--policy={workdir}",
       f"--tokenizer={os.path.dirname(tokenizer.path)}", f"--prompts={prompts}", "--budgets=4", "--betas=-4",
       "--base_tokens=6", "--batch_size=4", "--settings=paper_tradeoff"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((workdir / "evaluate_budget" / "report.json").read_text())
  assert (report["sampling"]["top_k"], report["sampling"]["min_p"], report["candidates"]) == (5, 0.01, 5)
  runs = report["budgets"]["4"]
  assert list(runs) == ["base (truncated)", "tilt beta -4", "at_most 4"]
  for name, run in runs.items():
    low, high = run["accuracy_95"]
    assert 0.0 <= low <= run["accuracy"] <= high <= 1.0
    assert ("vs_truncation" in run) == (name != "base (truncated)")
  assert "95% interval" in result.stdout and "p = " in result.stdout
