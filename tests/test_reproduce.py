"""experiments/reproduce.py end to end on a few training steps: sweep, scores, table, PNG."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_reproduce_writes_the_table_and_figure(tmp_path):
  out = tmp_path / "5b"
  printed = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--figure=5b", "--steps=4", f"--out_dir={out}"],
      cwd=REPO, check=True, capture_output=True, text=True, timeout=900).stdout
  results = json.loads((out / "results.json").read_text())
  assert [v["batching"] for v in results["variants"]] == ["shuffled", "grouped"]
  for variant in results["variants"]:
    assert 0 < variant["boundary_mre"] < 10 and variant["token_mre"] > 0 and variant["exact_mre"] > 0
  assert results["runs"][0]["prompt_groups"] == 64 and results["runs"][0]["samples"] == 1024
  assert (out / "figure_5b.png").stat().st_size > 0
  assert "| shuffled |" in printed and "| grouped |" in (out / "table.md").read_text()
  # A second call resumes: every point is done, only the scoring runs again.
  again = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--figure=5b", "--steps=4", f"--out_dir={out}"],
      cwd=REPO, check=True, capture_output=True, text=True, timeout=900).stdout
  assert "2 already done" in again
