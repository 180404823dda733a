"""experiments/reproduce.py end to end on a few training steps: sweep over two init seeds, scores, table with each
metric's seed range, PNG."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, one_device_env


@pytest.mark.slow
def test_reproduce_writes_the_table_and_figure(tmp_path):
  out = tmp_path / "5b"
  # One CPU device, as a user runs it (the runs' mesh is not what this tests): its four runs and their scoring take
  # 53 s of CPU per call against 81 s on conftest's 8 fake devices, with the same table.
  env = one_device_env()
  printed = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--figure=5b", "--steps=4", "--seeds=2", f"--out_dir={out}"],
      cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=900).stdout
  results = json.loads((out / "results.json").read_text())
  assert [v["batching"] for v in results["variants"]] == ["shuffled", "grouped"]
  for variant in results["variants"]:
    assert 0 < variant["boundary_mre"] < 10 and variant["token_mre"] > 0 and variant["exact_mre"] > 0
    assert variant["seeds"] == 2
    runs = [r for r in results["runs"] if r["batching"] == variant["batching"]]
    assert sorted(r["seed"] for r in runs) == ["0", "1"]
    for key in ("boundary_mre", "token_mre", "token_mae"):
      values = [r[key] for r in runs]
      assert (variant[key + "_min"], variant[key + "_max"]) == (min(values), max(values))
      assert variant[key] == pytest.approx(sum(values) / 2)
    assert variant["boundary_mre_min"] < variant["boundary_mre_max"]  # Two init seeds give two different runs.
  assert results["runs"][0]["prompt_groups"] == 64 and results["runs"][0]["samples"] == 1024
  assert (out / "figure_5b.png").stat().st_size > 0
  assert "| shuffled |" in printed and "| grouped |" in (out / "table.md").read_text()
  assert "Cells: mean [min, max] over 2 init seeds." in printed and "prompt-boundary MRE: lowest mean" in printed
  shuffled = results["variants"][0]
  assert (f"| shuffled | {shuffled['boundary_mre']:.4g} [{shuffled['boundary_mre_min']:.4g}, "
          f"{shuffled['boundary_mre_max']:.4g}] |") in printed
  # A second call resumes: every point is done, only the scoring runs again.
  again = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--figure=5b", "--steps=4", "--seeds=2", f"--out_dir={out}"],
      cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=900).stdout
  assert "4 already done" in again
