import dataclasses
import json
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest

from lenvm_jax.data import packing_stats, prepare, prompt_groups, synthetic
from lenvm_jax.data.packing_stats import best_fit, first_fit
from lenvm_jax.value import gamma as gamma_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_first_fit_fills_the_first_row_with_room_and_emits_the_last_partial_set():
  assert first_fit([5, 5, 5, 5], max_len=10, open_bins=1).rows == 2
  packing = first_fit([6, 5, 4, 5], max_len=10, open_bins=2)  # [6, 4] [5, 5]
  assert (packing.rows, packing.tokens, packing.efficiency) == (2, 20, 1.0)
  assert first_fit([3], max_len=10, open_bins=32).rows == 1
  assert first_fit([], max_len=10, open_bins=4).rows == 0


def test_a_sequence_that_fits_nowhere_flushes_every_open_row():
  # [9] [2] are emitted when the second 9 arrives, though 8 would later have filled [2]: grain flushes all bins.
  packing = first_fit([9, 2, 9, 8], max_len=10, open_bins=2)
  assert packing.rows == 4 and packing.efficiency == pytest.approx(28 / 40)


def test_best_fit_takes_the_fullest_row_with_room():
  # 3 goes to [7] (tightest), leaving room for 4 in [6]; first fit puts 3 into [6] and must flush for 4.
  assert best_fit([6, 7, 3, 4], max_len=10, open_bins=2).rows == 2
  assert first_fit([6, 7, 3, 4], max_len=10, open_bins=2).rows == 3
  assert best_fit([4, 4, 5], max_len=10, open_bins=3).rows == 2  # Ties go to the first row: [4, 4] [5].


def test_lengths_must_be_cut_to_max_len():
  with pytest.raises(ValueError, match="max_len=10"):
    first_fit([11], max_len=10, open_bins=2)
  with pytest.raises(ValueError, match="one of"):
    packing_stats.pack("next_fit", [1], 10, 2)


def _grain_pack(lengths, max_len, open_bins, packer) -> tuple[int, int]:
  """(rows, pad tokens) of grain's own packer over int arrays of these lengths."""
  ds = grain.MapDataset.source([{"tokens": np.ones(n, np.int32)} for n in lengths]).to_iter_dataset()
  packed = packer(ds, length_struct={"tokens": max_len}, num_packing_bins=open_bins, shuffle_bins=False)
  rows = list(packed)
  pad = sum(int(np.count_nonzero(row["tokens_segment_ids"] == 0)) for row in rows)
  assert all(int(row["tokens"].sum()) == max_len - int(np.count_nonzero(row["tokens_segment_ids"] == 0))
             for row in rows)
  return len(rows), pad


@pytest.mark.parametrize("policy,packer", [(first_fit, grain.experimental.FirstFitPackIterDataset),
                                           (best_fit, grain.experimental.BestFitPackIterDataset)])
@pytest.mark.parametrize("open_bins", [1, 3, 8])
def test_simulation_matches_grain_exactly(policy, packer, open_bins):
  max_len = 64
  rng = np.random.default_rng(open_bins)
  lengths = np.minimum(rng.geometric(1 / 20, size=400) + rng.integers(2, 10, size=400), max_len)
  simulated = policy(lengths, max_len, open_bins)
  rows, pad = _grain_pack(lengths, max_len, open_bins, packer)
  assert simulated.rows == rows
  assert simulated.rows * max_len - simulated.tokens == pad
  assert simulated.efficiency == 1 - pad / (rows * max_len)


def _trajectories(count):
  source = synthetic.SyntheticSource(synthetic.SyntheticPolicy(vocab_size=64), count, seed=0, gamma=0.98)
  out = []
  for i in range(count):
    t = dataclasses.replace(source[i], exact_values=None, generator="gen_a" if i % 3 else "gen_b",
                            finished=i % 7 != 3)
    out.append(("eval" if i % 5 == 0 else "train", t))
  return out


def test_cli_numbers_match_direct_computation(tmp_path):
  max_len, open_bins = 48, 4
  data = _trajectories(300)
  prepare.prepare((prepare.ImportedRecord(split, t, "synthetic", i + 1) for i, (split, t) in enumerate(data)),
                  str(tmp_path), vocab_size=64, max_len=max_len, shard_size=100)
  png = tmp_path / "plots" / "h.png"
  png.parent.mkdir()
  run = subprocess.run([sys.executable, "-m", "experiments.data_stats", str(tmp_path), f"--max_len={max_len}",
                        f"--open_bins={open_bins}", "--sweep_bins=2,4", f"--output_png={png}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert "suggested gamma" in run.stdout
  result = json.loads((tmp_path / "data_stats.json").read_text())
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  assert matplotlib.image.imread(str(png)).ndim == 3

  for split in ("train", "eval"):
    records = [t for s, t in data if s == split]
    summary = result["splits"][split]
    finished = [t for t in records if t.finished]
    # Packing order: train shuffled with --seed (0), eval as stored; unfinished dropped (--unfinished=drop).
    order = np.random.default_rng(0).permutation(len(records)) if split == "train" else np.arange(len(records))
    in_order = [records[i] for i in order if records[i].finished]
    sequence = np.array([min(len(t.prompt_ids) + len(t.completion_ids), max_len) for t in in_order])
    packing = summary["overall"]["packing"]
    assert packing["tokens"] == sequence.sum()
    assert packing["rows"] == first_fit(sequence, max_len, open_bins).rows >= np.ceil(sequence.sum() / max_len)
    assert packing["efficiency"] == pytest.approx(sequence.sum() / (packing["rows"] * max_len))
    assert packing["truncated"] == sum(len(t.prompt_ids) + len(t.completion_ids) > max_len for t in finished)
    assert summary["overall"]["unfinished"] == len(records) - len(finished)
    for name in ("gen_a", "gen_b"):
      lengths = np.array([len(t.completion_ids) for t in finished if t.generator == name])
      generator = summary["generators"][name]
      np.testing.assert_allclose([generator["p50"], generator["p90"], generator["p99"]],
                                 np.percentile(lengths, [50, 90, 99]))
      unfinished = sum(not t.finished for t in records if t.generator == name)
      assert generator["unfinished"] == unfinished
      assert generator["unfinished_fraction"] == pytest.approx(
          unfinished / sum(t.generator == name for t in records))
      sequence = np.array([min(len(t.prompt_ids) + len(t.completion_ids), max_len)
                           for t in in_order if t.generator == name])
      assert generator["packing"]["tokens"] == sequence.sum()
      assert generator["packing"]["rows"] == first_fit(sequence, max_len, open_bins).rows

  train_p99 = np.percentile([len(t.completion_ids) for s, t in data if s == "train" and t.finished], 99)
  assert result["suggested_gamma"] == pytest.approx(0.01 ** (1 / train_p99))
  train_groups = prompt_groups.group_by_prompt([t for s, t in data if s == "train"])
  assert result["auto_mre_gamma"] == gamma_lib.least_mre_gamma(train_groups)[0]
  assert set(result["splits"]["train"]["packing_sweep"]) == {"first_fit", "best_fit"}
  assert result["splits"]["train"]["packing_sweep"]["first_fit"]["4"] == pytest.approx(
      result["splits"]["train"]["overall"]["packing"]["efficiency"])


def test_cli_append_eos_packs_each_cut_completion_with_its_appended_eos(tmp_path):
  """--unfinished=append_eos keeps cut completions, each one token longer in its row (the EOS the pipeline adds)."""
  max_len, open_bins = 48, 4
  data = _trajectories(70)
  prepare.prepare((prepare.ImportedRecord(split, t, "synthetic", i + 1) for i, (split, t) in enumerate(data)),
                  str(tmp_path), vocab_size=64, max_len=max_len, shard_size=100)
  run = subprocess.run([sys.executable, "-m", "experiments.data_stats", str(tmp_path), f"--max_len={max_len}",
                        f"--open_bins={open_bins}", "--unfinished=append_eos"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  records = [t for s, t in data if s == "eval"]  # Eval packs in stored order.
  assert any(not t.finished for t in records)
  sequence = np.array([min(len(t.prompt_ids) + len(t.completion_ids) + (not t.finished), max_len) for t in records])
  packing = json.loads((tmp_path / "data_stats.json").read_text())["splits"]["eval"]["overall"]["packing"]
  assert packing["tokens"] == sequence.sum() and packing["rows"] == first_fit(sequence, max_len, open_bins).rows
  assert packing["truncated"] == sum(len(t.prompt_ids) + len(t.completion_ids) + (not t.finished) > max_len
                                     for t in records)


def test_cli_without_shards_fails_cleanly(tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.data_stats", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 2 and "no train or eval ArrayRecord shards" in run.stderr
