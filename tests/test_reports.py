"""Reports and outputs of the evaluation tools (issue 29): a run that fails keeps the earlier report instead of
leaving it empty or half-written, and an output path that cannot be written is refused before the work it would
record. CLIs run as subprocesses (their absl flags clash in one process)."""

import json
import os

import pytest

from tests.helpers import REPO, assert_one_error_line, run_cli

LEGACY_RUN = os.path.join(REPO, "tests", "fixtures", "legacy_run")  # A trained tiny synthetic run (vocabulary 64).


@pytest.mark.slow
def test_predict_that_fails_keeps_the_earlier_report_and_one_that_works_replaces_it(tmp_path):
  """predict opened its output for writing before predicting: a failed prompt_eval left the earlier report empty."""
  cut = tmp_path / "cut.jsonl"
  cut.write_text("".join(json.dumps({"prompt_ids": [3, 4 + i], "completion_ids": [5, 6, 7], "prompt_id": f"p{i}",
                                     "finished": False}) + "\n" for i in range(4)))
  report = tmp_path / "report.json"
  report.write_text('{"earlier": "report"}')
  base = ("predict", "--mode=prompt_eval", f"--workdir={LEGACY_RUN}", f"--output={report}")
  assert_one_error_line(run_cli(*base, f"--input={cut}"), str(cut), "needs finished trajectories")
  assert report.read_text() == '{"earlier": "report"}'
  finished = tmp_path / "finished.jsonl"
  finished.write_text(cut.read_text().replace('"finished": false', '"finished": true'))
  assert run_cli(*base, f"--input={finished}").returncode == 0
  written = json.loads(report.read_text())
  assert written["prompt_groups"] == 4 and written["checkpoint_step"] == 4
  assert sorted(os.listdir(tmp_path)) == ["cut.jsonl", "finished.jsonl", "report.json"]  # No temporary left.


@pytest.mark.slow
def test_bench_checks_its_json_output_before_measuring(tmp_path):
  for path, needle in ((tmp_path / "missing" / "b.json", "the output's directory does not exist"),
                       (tmp_path, "the output is a directory")):
    last = assert_one_error_line(run_cli("bench", "--preset=tiny", "--skip_torch", f"--json={path}"), needle)
    assert f"--json={path}" in last
  assert not (tmp_path / "missing").exists()


@pytest.mark.slow
def test_train_refuses_a_metrics_log_linked_outside_its_workdir_before_any_work(tmp_path):
  victim = tmp_path / "elsewhere.txt"
  victim.write_text("someone else's file, no newline")
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "metrics.jsonl").symlink_to(victim)
  assert_one_error_line(run_cli("train", "--config=experiments/configs/tiny.py", f"--workdir={workdir}"),
                  "a symbolic link where the run writes its own log", str(workdir / "metrics.jsonl"))
  assert victim.read_text() == "someone else's file, no newline"
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
