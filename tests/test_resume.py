"""Kill -9 after a checkpoint, rerun the same command: the run continues exactly as if never stopped."""

import pytest
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import REPO

STEPS = 24


def _command(workdir):
  return [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/tiny.py",
          "--workdir", str(workdir), f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=5",
          "--config.checkpoint.async_save=True", "--config.train.eval_every=0", "--config.train.accum_steps=2",
          "--config.train.batch_size=16"]  # 2 micro-batches of 8 rows over the 8 fake devices (inherited XLA_FLAGS).


def _run(workdir):
  result = subprocess.run(_command(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]


def _logged(workdir, split="train"):
  """Last logged record per step (a resumed run re-logs the steps after its checkpoint)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {r["step"]: r for r in records if r["split"] == split}


def _final_params(workdir):
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data_iter"))
  state = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return state["params"]


def _wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, "training exited before the test could interrupt it"
    assert time.time() < deadline, "timed out waiting for training progress"
    time.sleep(0.05)


@pytest.mark.slow
def test_kill_nine_then_rerun_matches_an_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _run(straight)

  process = subprocess.Popen(_command(resumed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = resumed / "checkpoints"
  _wait_for(lambda: (checkpoints / "10").is_dir() and max(_logged(resumed), default=0) >= 12, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(_logged(resumed))
  assert killed_at < STEPS
  # A save that died half-way leaves a temporary directory: it must be ignored, not restored.
  (checkpoints / f"{killed_at + 1}.orbax-checkpoint-tmp-1700000000").mkdir()
  (checkpoints / f"{killed_at + 1}.orbax-checkpoint-tmp-1700000000" / "garbage").write_text("half written")

  _run(resumed)
  want, got = _logged(straight), _logged(resumed)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert got[step]["loss"] == want[step]["loss"], step
    assert got[step]["value_mse"] == want[step]["value_mse"], step
  for a, b in zip(_flatten(_final_params(straight)), _flatten(_final_params(resumed))):
    np.testing.assert_array_equal(a, b)
  config = json.loads((resumed / "config.json").read_text())
  assert config["train"]["steps"] == STEPS and config["loss"]["gamma"] == 0.98


def _flatten(tree):
  import jax
  return jax.tree.leaves(tree)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "w"
  command = _command(workdir)
  command[command.index(f"--config.train.steps={STEPS}")] = "--config.train.steps=100000"
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: max(_logged(workdir), default=0) >= 3, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  assert "SIGTERM received" in stderr
  last = max(_logged(workdir))
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] >= last
