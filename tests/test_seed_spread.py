"""Seed spreads per variant (lenvm_jax/evaluation/seed_spread.py): what experiments/reproduce.py tables print."""

import math

import pytest

from lenvm_jax.evaluation import seed_spread


def _rows():
  runs = {"a": [0.20, 0.22, 0.25], "b": [0.30, 0.35, 0.31], "c": [0.24, 0.40, 0.50]}
  return [{"target": name, "seed": str(i), "mre": value, "mae": 10.0 + i, "exact": 0.1,
           "history": [{"step": 1, "mre": value}, {"step": 2, "mre": value / 2}]}
          for name, values in runs.items() for i, value in enumerate(values)]


def test_by_variant_gives_each_metric_its_mean_and_seed_range():
  variants = seed_spread.by_variant(_rows(), "target", ["mre", "mae", "missing"], ("mre",))
  assert [v["target"] for v in variants] == ["a", "b", "c"] and all(v["seeds"] == 3 for v in variants)
  a = variants[0]
  assert a["mre"] == pytest.approx(0.67 / 3) and (a["mre_min"], a["mre_max"]) == (0.20, 0.25)
  assert a["mre_std"] == pytest.approx(math.sqrt(sum((x - 0.67 / 3) ** 2 for x in (0.2, 0.22, 0.25)) / 3))
  assert (a["mae"], a["mae_min"], a["mae_max"]) == (11.0, 10.0, 12.0) and "missing" not in a
  assert a["history"] == [{"step": 1, "mre": pytest.approx(0.67 / 3)}, {"step": 2, "mre": pytest.approx(0.67 / 6)}]
  # A NaN (a run without that metric logged) is left out of the spread, not propagated.
  rows = _rows()
  rows[0]["mre"] = float("nan")
  assert seed_spread.by_variant(rows, "target", ["mre"])[0]["mre"] == pytest.approx(0.235)
  assert seed_spread.format_cell(a, "mre") == "0.2233 [0.2, 0.25]"
  assert seed_spread.format_cell({**a, "seeds": 1}, "mae") == "11" and seed_spread.format_cell(a, "missing") == ""


def test_separation_says_which_variants_every_seed_of_the_best_beats():
  variants = seed_spread.by_variant(_rows(), "target", ["mre", "exact"])
  # b's seeds (0.30 - 0.35) all lie above a's (0.20 - 0.25); c's lowest seed (0.24) falls inside a's range.
  assert seed_spread.separation(variants, "target", "mre") == {"best": "a", "seeds": 3, "separated": ["b"],
                                                                "overlapping": ["c"]}
  assert seed_spread.separation(variants[:1], "target", "mre") is None
  printed = seed_spread.format_separation(variants, "target", [("mre", "prompt MRE")])
  assert printed == "  prompt MRE: lowest mean a (apart from b; overlapping c)"
  single = seed_spread.by_variant([r for r in _rows() if r["seed"] == "0"], "target", ["mre"])
  assert "one seed: no spread" in seed_spread.format_separation(single, "target", [("mre", "prompt MRE")])
  with pytest.raises(ValueError, match="no values"):
    seed_spread.spread([])
