"""Sweep specs (shared with the XManager launcher) and a local sweep that is interrupted, resumed and summarized."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, one_device_env
from lenvm_jax import sweep_spec


def test_product_zip_names_and_flags():
  specs = ["config.loss.gamma=0.99,0.997", "--config.optim.lr=1e-3,3e-4", "config.train.steps=50"]
  named = sweep_spec.named_points(specs)
  assert [n for n, _ in named] == ["gamma=0.99,lr=1e-3", "gamma=0.99,lr=3e-4", "gamma=0.997,lr=1e-3",
                                   "gamma=0.997,lr=3e-4"]
  assert sweep_spec.trainer_flags(named[1][1]) == ["--config.loss.gamma=0.99", "--config.optim.lr=3e-4",
                                                   "--config.train.steps=50"]
  zipped = sweep_spec.named_points(specs[:2], zip_axes=True)
  assert [p for _, p in zipped] == [{"config.loss.gamma": "0.99", "config.optim.lr": "1e-3"},
                                    {"config.loss.gamma": "0.997", "config.optim.lr": "3e-4"}]
  # Brackets keep tuple values whole; axes sharing a last name keep their full path in the workdir name.
  named = sweep_spec.named_points(["config.data.synthetic.hazards=(0.05,0.3),(0.1,0.2)", "config.data.seed=0,1",
                                   "config.seed=0,1"], zip_axes=True)
  assert [p["config.data.synthetic.hazards"] for _, p in named] == ["(0.05,0.3)", "(0.1,0.2)"]
  assert named[0][0] == "hazards=_0.05,0.3_,data.seed=0,seed=0"


@pytest.mark.parametrize("specs, zip_axes, message", [
    (["loss.gamma=0.9"], False, "expected config.<field>"),
    (["config.loss.gamma"], False, "expected config.<field>"),
    (["config.loss.gamma=0.9,,0.99"], False, "empty value"),
    (["config.loss.gamma=0.9", "config.loss.gamma=0.99"], False, "given twice"),
    (["config.loss.gamma=0.9,0.99", "config.optim.lr=1e-3"], True, "equal length"),
    (["config.data.synthetic.hazards=(0.1),[0.1]"], False, "same workdir name"),
])
def test_bad_specs_are_named(specs, zip_axes, message):
  with pytest.raises(sweep_spec.SweepError, match=message):
    sweep_spec.named_points(specs, zip_axes)


# Steps per point: enough that the first point is still training well after its first checkpoint (step 5) when the
# test interrupts it (measured on one device: stopped at step 7 of 30; the test asserts that it did interrupt), few
# enough to be cheap.
STEPS = 30


def _sweep(sweep_dir, *extra):
  command = [sys.executable, "-m", "experiments.sweep", "--config=experiments/configs/tiny.py",
             f"--sweep_dir={sweep_dir}", "--sweep=config.loss.gamma=0.9,0.97", f"--sweep=config.train.steps={STEPS}",
             "--sweep=config.train.eval_every=0", *extra]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=one_device_env())


def test_url_sweep_dir_is_refused():
  sweep = _sweep("gs://bucket/sweep")
  output, _ = sweep.communicate(timeout=120)
  assert sweep.returncode != 0 and "'gs://bucket/sweep' is a URL" in output, output
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def _train_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_sweep_interrupted_then_resumed(tmp_path):
  sweep_dir = tmp_path / "sweep"
  first_point = sweep_dir / "gamma=0.9"
  proc = _sweep(sweep_dir)
  deadline = time.monotonic() + 600
  while not (first_point / "checkpoints" / "5").exists():  # tiny config: a checkpoint every 5 steps.
    assert proc.poll() is None, proc.communicate()[0]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 1, out
  assert "gamma=0.9: stopped" in out and not (sweep_dir / "gamma=0.97").exists()
  stopped_at = max(_train_steps(first_point))
  assert stopped_at < STEPS, "the first point finished before the interrupt: the test did not interrupt anything"

  proc = _sweep(sweep_dir, "--parallel=2")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  # Resumed, not restarted: the log continues after the checkpointed step (the trainer saves on SIGTERM); a restart
  # from scratch would log steps 1..stopped_at twice.
  assert _train_steps(first_point) == list(range(1, STEPS + 1))
  assert _train_steps(sweep_dir / "gamma=0.97") == list(range(1, STEPS + 1))
  for name, gamma in (("gamma=0.9", 0.9), ("gamma=0.97", 0.97)):
    with open(sweep_dir / name / "config.json", encoding="utf-8") as f:
      assert json.load(f)["loss"]["gamma"] == gamma

  with open(sweep_dir / "summary.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["point"], r["status"], r["config.loss.gamma"], r["step"]) for r in rows] == [
      ("gamma=0.9", "done", "0.9", str(STEPS)), ("gamma=0.97", "done", "0.97", str(STEPS))]
  assert float(rows[0]["eval/loss"]) != float(rows[1]["eval/loss"])
  table = out[out.index("point "):].splitlines()
  assert table[0].split() == ["point", "status", "step", "train/loss", "eval/loss", "eval/length_mae"]
  assert table[1].split()[:3] == ["gamma=0.9", "done", str(STEPS)]

  proc = _sweep(sweep_dir)  # Everything done: nothing is retrained, the table is written again.
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "2 points, 2 already done" in out and "sweep: start" not in out, out
