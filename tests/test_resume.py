"""Kill -9 after a checkpoint, rerun the same command: the run continues exactly as if never stopped."""

import pytest
import json
import os
import signal
import subprocess

import numpy as np

from tests.helpers import REPO, TRAIN_STEPS, final_params, leaves, logged, train_command, wait_for


def _run(workdir):
  result = subprocess.run(train_command(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_kill_nine_then_rerun_matches_an_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _run(straight)

  process = subprocess.Popen(train_command(resumed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = resumed / "checkpoints"
  wait_for(lambda: (checkpoints / "10").is_dir() and max(logged(resumed), default=0) >= 12, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(logged(resumed))
  assert killed_at < TRAIN_STEPS
  # A save that died half-way leaves a temporary directory: it must be ignored, not restored.
  (checkpoints / f"{killed_at + 1}.orbax-checkpoint-tmp-1700000000").mkdir()
  (checkpoints / f"{killed_at + 1}.orbax-checkpoint-tmp-1700000000" / "garbage").write_text("half written")

  _run(resumed)
  want, got = logged(straight), logged(resumed)
  assert sorted(got) == sorted(want) == list(range(1, TRAIN_STEPS + 1))
  for step in range(1, TRAIN_STEPS + 1):
    assert got[step]["loss"] == want[step]["loss"], step
    assert got[step]["value_mse"] == want[step]["value_mse"], step
  for a, b in zip(leaves(final_params(straight)), leaves(final_params(resumed))):
    np.testing.assert_array_equal(a, b)
  config = json.loads((resumed / "config.json").read_text())
  assert config["train"]["steps"] == TRAIN_STEPS and config["loss"]["gamma"] == 0.98


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "w"
  command = train_command(workdir)
  command[command.index(f"--config.train.steps={TRAIN_STEPS}")] = "--config.train.steps=100000"
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: max(logged(workdir), default=0) >= 3, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  assert "SIGTERM received" in stderr
  last = max(logged(workdir))
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] >= last
