"""A run directory written before the typed RunConfig (config.json with model.gamma, orbax checkpoints of that
day's TrainState) still predicts, exports and resumes: tests/fixtures/legacy_run came from commit ffda7a6
(`experiments.train --config experiments/configs/tiny.py --config.train.steps=4 --config.checkpoint.every_steps=4
--config.checkpoint.keep=1 --config.train.eval_every=0 --config.mesh.data=1`), and expected_prediction.json holds
what that commit's Predictor printed for one trajectory."""

import pytest
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from lenvm_jax.run import checkpoint_layout, config_history
from lenvm_jax.data.records import Trajectory
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.train import trainer
from tests.helpers import REPO, run_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "legacy_run"


def _copy(tmp_path) -> pathlib.Path:
  workdir = tmp_path / "legacy_run"
  shutil.copytree(FIXTURE, workdir)
  return workdir


def test_legacy_config_loads_with_gamma_in_its_new_home():
  raw = json.loads((FIXTURE / "config.json").read_text())
  assert "gamma" in raw["model"] and "gamma" not in raw.get("loss", {})  # Really the old layout.
  run = config_history.read_config(str(FIXTURE))
  assert run.loss.gamma == raw["model"]["gamma"] and run.model.num_layers == raw["model"]["num_layers"]


def test_legacy_run_predicts_what_it_predicted_when_it_was_written(tmp_path):
  expected = json.loads((FIXTURE / "expected_prediction.json").read_text())
  predictor = Predictor(str(_copy(tmp_path)))
  assert predictor.step == expected["step"]
  trajectory = Trajectory(np.asarray(expected["prompt_ids"], np.int32), np.asarray(expected["completion_ids"], np.int32))
  values, remaining = predictor.predict([trajectory])[0]
  np.testing.assert_allclose(values, expected["values"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(remaining, expected["remaining"], rtol=1e-5)


def test_legacy_run_exports(tmp_path):
  out = tmp_path / "hf"
  result = subprocess.run([sys.executable, "-m", "experiments.export_hf", f"--workdir={_copy(tmp_path)}",
                           f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert (out / "config.json").exists() and (out / "value_head.safetensors").exists()


@pytest.mark.slow
def test_legacy_run_resumes_from_its_checkpoint(tmp_path, tiny_config):
  workdir = _copy(tmp_path)
  tiny_config.train.steps = 6
  tiny_config.train.eval_every = 0
  tiny_config.checkpoint.every_steps = 4
  tiny_config.checkpoint.keep = 1
  tiny_config.mesh.data = 1
  trainer.train_and_evaluate(run_config(tiny_config), str(workdir))
  steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
  assert steps == [5, 6]  # Continued after step 4; a restart from scratch would log steps 1 .. 6.
  assert checkpoint_layout.latest_step(str(workdir)) == 6
  assert json.loads((workdir / "config.json").read_text())["loss"]["gamma"] == 0.98
