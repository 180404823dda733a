"""What the data settings cut or drop, said per split (data/cut_report.py); data.prompt_cut; train.epochs; a job
config's data directory from one argument."""

import json
import math

import numpy as np
import pytest

from lenvm_jax.config import ConfigError, DataConfig, TrainConfig
from lenvm_jax.data import cut_report, packing_stats, rows
from lenvm_jax.data.records import Trajectory
from tests.cli_server import CliServers
from tests.helpers import assert_one_error_line, run_config, write_lines


def _trajectory(prompt: int, completion: int, finished: bool = True, prompt_id=None):
  return Trajectory(np.arange(2, 2 + prompt, dtype=np.int32) % 60 + 2, np.full(completion, 7, np.int32), finished,
                    prompt_id=prompt_id)


RECORDS = [_trajectory(4, 10), _trajectory(12, 5), _trajectory(3, 30), _trajectory(5, 8, finished=False),
           _trajectory(20, 40, finished=False)]


@pytest.mark.parametrize("unfinished", ["drop", "censored", "append_eos"])
def test_counts_are_exact(unfinished):
  data = DataConfig(max_len=24, max_prompt_len=8, unfinished=unfinished, eos_id=1)
  report = cut_report.count(RECORDS, data, "train")
  counts = report.to_dict()
  assert counts["unfinished"] == 2 and counts["unfinished_tokens"] == 48
  if unfinished == "drop":
    # Kept: 4+10 (fits), 12->8 prompt (4 cut) + 5 (fits), 3+30 (9 past max_len). Dropped: 5+8 and 20+40.
    assert (counts["dropped"], counts["dropped_tokens"]) == (2, 73)
    assert (counts["prompts_cut"], counts["prompt_tokens_cut"]) == (1, 4)
    assert (counts["rows_cut"], counts["row_tokens_cut"]) == (1, 9)
    assert report.kept == 3 and report.row_lengths == [14, 13, 24]
  else:
    extra = unfinished == "append_eos"  # The appended EOS is one more token in the row.
    assert counts["dropped"] == 0
    assert (counts["prompts_cut"], counts["prompt_tokens_cut"]) == (2, 4 + 12)
    assert (counts["rows_cut"], counts["row_tokens_cut"]) == (2, 9 + 8 + 40 + extra - 24)
    assert report.kept == 5
  assert f"data.unfinished={unfinished}" in report.line() or unfinished == "drop"


def test_sampled_counts_scale_and_say_so():
  report = cut_report.count(RECORDS * 4, DataConfig(max_len=24, max_prompt_len=8), "eval", limit=5)
  assert report.counted == 5 and report.to_dict()["dropped"] == 8  # 2 of the 5 read, scaled by 20 / 5.
  assert "estimated from 5 records" in report.line()


def test_refuse_names_the_record_and_the_field():
  data = DataConfig(max_len=64, max_prompt_len=10, prompt_cut="refuse")
  records = [_trajectory(4, 3), _trajectory(11, 3, prompt_id="p7")]
  with pytest.raises(ConfigError, match=r"config\.data\.max_prompt_len: eval record 1 \(prompt_id 'p7'\) has a "
                                        r"11-token prompt"):
    cut_report.count(records, data, "eval")
  cut_report.count(records, DataConfig(max_len=64, max_prompt_len=11, prompt_cut="refuse"), "eval")


def test_prompt_cut_keeps_the_tail_or_the_head():
  prompt = np.arange(10)
  np.testing.assert_array_equal(rows.cut_prompt(prompt, 4, "tail"), [6, 7, 8, 9])
  np.testing.assert_array_equal(rows.cut_prompt(prompt, 4, "head"), [0, 1, 2, 3])
  np.testing.assert_array_equal(rows.cut_prompt(prompt, 0, "head"), prompt)
  with pytest.raises(ValueError, match="refuse"):
    rows.cut_prompt(prompt, 4, "refuse")
  row = rows.trajectory_to_row(Trajectory(prompt.astype(np.int32), np.array([5, 1], np.int32)), 32,
                               max_prompt_len=4, prompt_cut="head")
  np.testing.assert_array_equal(row[rows.TOKENS], [0, 1, 2, 3, 5, 1])


def test_steps_for_epochs():
  data = DataConfig(max_len=24, max_prompt_len=8, packing="none")
  report = cut_report.count(RECORDS, data, "train")  # 3 kept records.
  assert cut_report.steps_for_epochs(2.0, report, data, batch_size=2, open_bins=2) == 3  # ceil(6 / 2).
  packed = DataConfig(max_len=24, max_prompt_len=8, packing="first_fit")
  per_row = cut_report.records_per_row(report, packed, open_bins=2)
  simulated = packing_stats.first_fit([14, 13, 24], 24, 2)
  assert per_row == simulated.sequences / simulated.rows == 1.0  # 14 + 13 > 24: one record a row.
  assert cut_report.steps_for_epochs(0.5, report, packed, batch_size=2, open_bins=2) == math.ceil(1.5 / 2)


def test_exactly_one_of_steps_and_epochs():
  assert TrainConfig(steps=0, epochs=1.5).epochs == 1.5
  with pytest.raises(ConfigError, match=r"config\.train\.epochs: is 2.0 and train\.steps is 1000: set exactly one"):
    TrainConfig(epochs=2.0)
  with pytest.raises(ConfigError, match=r"config\.train\.steps: must be positive, or 0 with train\.epochs"):
    TrainConfig(steps=0)
  with pytest.raises(ConfigError, match=r"config\.data\.prompt_cut"):
    DataConfig(prompt_cut="middle")


@pytest.fixture(scope="module")
def clis(tmp_path_factory):
  """The tools run as processes of their own, forked from one server per tool (tests/cli_server.py): one python +
  jax import per tool, not per call."""
  servers = CliServers(tmp_path_factory.mktemp("cli_servers"))
  yield servers
  servers.close()


@pytest.mark.slow
def test_training_by_epochs_reports_cuts_and_passes(tiny_config, tmp_path, clis):
  rng = np.random.default_rng(0)
  lines = []
  for i in range(24):
    prompt = rng.integers(10, 60, 14 if i % 4 == 0 else 5).tolist()  # Every 4th prompt is cut (max_prompt_len 8).
    finished = i % 6 != 5  # 4 unfinished, dropped.
    completion = rng.integers(10, 60, int(rng.integers(2, 12))).tolist() + ([1] if finished else [])
    lines.append(json.dumps({"prompt_ids": prompt, "completion_ids": completion, "finished": finished}))
  config = tiny_config
  config.data.source = "jsonl"
  config.data.train_path = write_lines(tmp_path / "train.jsonl", lines)
  config.data.max_len = 24
  config.data.max_prompt_len = 8
  config.data.prompt_cut = "head"
  config.data.packing = "none"
  config.train.steps = 0
  config.train.epochs = 2.0
  config.train.batch_size = 8
  config.train.log_every = 1
  from lenvm_jax.train import trainer
  trainer.train_and_evaluate(run_config(config), str(tmp_path / "run"))
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  data = next(r for r in records if r["split"] == "data_train")
  assert (data["records"], data["dropped"], data["prompts_cut"], data["prompt_tokens_cut"]) == (24, 4, 6, 36)
  train = [r for r in records if r["split"] == "train"]
  assert len(train) == math.ceil(2 * 20 / 8) == 5  # 20 kept records, 8 a step.
  assert train[-1]["epochs"] == pytest.approx(5 * 8 / 20)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert (saved["train"]["steps"], saved["train"]["epochs"]) == (5, 0.0)
  # The run trained without an eval split: evaluate_lengths reads held-out records from --eval_path instead.
  result = clis.run("evaluate_lengths", f"--workdir={tmp_path / 'run'}", f"--eval_path={config.data.train_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "run" / "length_eval.json").read_text())
  assert report["counts"]["trajectories"] == 20 and report["intervals"]["prompt_mre"]["problems"] > 1
  # --reuse reads that report back for the same step and flags, and evaluates again when a flag differs.
  for seed, reused in ((0, True), (1, False)):
    result = clis.run("evaluate_lengths", f"--workdir={tmp_path / 'run'}", f"--eval_path={config.data.train_path}",
                     "--reuse", f"--bootstrap_seed={seed}")
    assert result.returncode == 0 and ("--reuse:" in result.stdout) == reused, result.stdout[-2000:]


@pytest.mark.slow
def test_a_job_config_takes_its_data_directory_from_one_argument(tmp_path, clis):
  missing = tmp_path / "nowhere"
  result = clis.run("train", f"--config=experiments/configs/smollm2_gsm.py:data_dir={missing}",
                   f"--workdir={tmp_path / 'run'}")
  assert_one_error_line(result, "config.data.train_path", str(missing / "train"))
  result = clis.run("train", "--config=experiments/configs/smollm2_mix.py:dir=x", f"--workdir={tmp_path / 'run'}")
  assert_one_error_line(result, "data_dir=DIR")
