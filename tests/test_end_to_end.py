"""Short real training runs: the model learns the synthetic value function; predict reads the run back."""

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import synthetic as synthetic_config
from lenvm_jax.data import pipeline
from lenvm_jax.data.records import Trajectory
from lenvm_jax.decoding.predict import Predictor
from tests.helpers import REPO, optimized_env, run_config

# 180 of the main job's 1500 steps. Measured on 2 CPU cores: 180 steps close 94.1 % of the gap to Bayes-optimal
# (300: 97.3 %, 1500: 99.9 %), and guidance lifts the Equal To score from 13 to 79 (the evaluate test asks for +20).
SHORT_RUN_STEPS = 180
SHORT_RUN_GAP_CLOSED = 0.9


def gap_closed(record):
  return (record["const_value_mse"] - record["value_mse"]) / (record["const_value_mse"] - record["bayes_value_mse"])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """The main job's command, shortened; a subprocess, so that its 300 steps run XLA-optimized (optimized_env)."""
  config = synthetic_config.get_config()
  config.train.steps = SHORT_RUN_STEPS
  config.train.eval_every = 0
  config.mesh.data = 1  # One device: the test measures learning, not sharding.
  workdir = tmp_path_factory.mktemp("short_run")
  subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/synthetic.py",
                  f"--workdir={workdir}", f"--config.train.steps={SHORT_RUN_STEPS}", "--config.train.eval_every=0",
                  "--config.mesh.data=1"], cwd=REPO, env=optimized_env(), check=True, capture_output=True,
                 timeout=900)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final_eval = [r for r in records if r["split"] == "eval"][-1]
  return workdir, config, final_eval


@pytest.mark.slow
def test_short_run_closes_most_of_the_gap_to_bayes_optimal(short_run):
  _, _, final_eval = short_run
  assert final_eval["bayes_value_mse"] < final_eval["const_value_mse"]
  assert gap_closed(final_eval) >= SHORT_RUN_GAP_CLOSED, final_eval
  assert np.isfinite(final_eval["length_mae"]) and final_eval["length_mre_at_0"] > 0


@pytest.mark.slow
def test_metrics_jsonl_has_train_and_eval_records(short_run):
  workdir, _, final_eval = short_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert train[-1]["step"] == SHORT_RUN_STEPS and evals[-1]["step"] == SHORT_RUN_STEPS
  for key in ("loss", "value_mse", "length_mae", "length_mre", "length_mae_at_50", "length_mre_at_75",
              "tokens_per_s", "flops_per_s", "grad_norm"):
    assert key in train[-1], key
  assert evals[-1]["loss"] == pytest.approx(final_eval["value_mse"], rel=1e-4)  # Discounted target, no LM term.
  assert list((workdir / "tensorboard").iterdir())


@pytest.mark.slow
def test_predict_cli_writes_values_for_every_state(short_run, tmp_path):
  workdir, config, _ = short_run
  source = pipeline.load_source(run_config(config), "eval")
  trajectories = [source[i] for i in range(5)]
  inputs = tmp_path / "in.jsonl"
  inputs.write_text("".join(json.dumps({"prompt_ids": t.prompt_ids.tolist(),
                                        "completion_ids": t.completion_ids.tolist()}) + "\n" for t in trajectories))
  outputs = tmp_path / "out.jsonl"
  subprocess.run([sys.executable, "-m", "experiments.predict", "--workdir", str(workdir), "--input", str(inputs),
                  "--output", str(outputs)], cwd=REPO, check=True, capture_output=True, timeout=300)
  predictions = [json.loads(line) for line in outputs.read_text().splitlines()]
  assert len(predictions) == 5
  gamma = config.loss.gamma
  for t, p in zip(trajectories, predictions):
    assert len(p["values"]) == len(p["remaining"]) == len(t.completion_ids) + 1
    values = np.asarray(p["values"])
    assert ((values > -1) & (values < 0)).all()
    np.testing.assert_allclose(p["remaining"], np.log1p(values) / np.log(gamma), rtol=1e-3, atol=1e-2)
    # A trained model tracks the exact value function of the synthetic policy.
    assert np.mean(np.abs(values - t.exact_values)) < 0.1


@pytest.mark.slow
def test_predictor_reloads_the_last_step_and_ignores_batching(short_run):
  workdir, config, _ = short_run
  predictor = Predictor(str(workdir))
  assert predictor.step == SHORT_RUN_STEPS
  t = pipeline.load_source(run_config(config), "eval")[0]
  (values, remaining), = predictor.predict([t])
  (values_again, _), = predictor.predict([t, t, t], batch_size=2)[1:2]
  np.testing.assert_allclose(values, values_again, atol=1e-6)  # Independent of batching and padding.


@pytest.mark.slow
def test_predict_prompts_is_the_first_state_of_predict(short_run):
  predictor = Predictor(str(short_run[0]))
  full = [Trajectory(np.asarray(p, np.int32), np.full(n, 12, np.int32)) for p, n in (([5, 20], 7), ([30, 31], 3))]
  values, lengths = predictor.predict_prompts(full)
  for t, value, length in zip(full, values, lengths):
    (v, n), = predictor.predict([t])
    assert value == pytest.approx(v[0], abs=1e-6) and length == pytest.approx(n[0], rel=1e-5)


@pytest.mark.slow
def test_predict_cli_prompt_modes(short_run, tmp_path):
  prompts, samples = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
  prompts.write_text('{"prompt_ids": [5, 20, 21], "prompt_id": "a"}\n{"prompt_ids": [30, 31]}\n')
  samples.write_text("".join(json.dumps({"prompt_ids": [5, 20, 21], "completion_ids": [12] * n + [1],
                                         "prompt_id": "a", "generator": "g"}) + "\n" for n in (3, 9)))
  run = lambda mode, inputs, out: subprocess.run(
      [sys.executable, "-m", "experiments.predict", f"--mode={mode}", "--workdir", str(short_run[0]), "--input",
       str(inputs), "--output", str(out)], cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
  run("prompts", prompts, tmp_path / "boundary.jsonl")
  lines = [json.loads(x) for x in (tmp_path / "boundary.jsonl").read_text().splitlines()]
  assert [x["prompt_id"] for x in lines] == ["a", None] and all(x["predicted_length"] >= 0 for x in lines)
  printed = run("prompt_eval", samples, tmp_path / "report.json").stdout
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["prompt_groups"] == 1 and set(report["mre"]) == {"*", "g"} and "MRE" in printed
  group, = report["groups"]
  assert group["predicted_length"] == pytest.approx(lines[0]["predicted_length"], abs=1e-3)


@pytest.mark.slow
def test_evaluate_cli_writes_report_and_plots(short_run):
  workdir, _, _ = short_run
  printed = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", "--workdir", str(workdir), "--prompts=16", "--targets=16,48",
       "--betas=0,-8", "--trajectories=16", "--budget=48", "--batch_size=16"],
      cwd=REPO, check=True, capture_output=True, text=True, timeout=600).stdout
  out = workdir / "evaluate"
  report = json.loads((out / "report.json").read_text())
  for name in ("remaining_length", "tradeoff", "score_table"):
    assert (out / f"{name}.png").stat().st_size > 0
  equal_to = report["length_instruction"]["equal_to"]["mean_score"]
  assert equal_to["guided"] > equal_to["unguided"] + 20, equal_to  # Measured at 500 steps: 14 -> 75 (64 prompts).
  sweep = report["quality_vs_length"]["sweep"]
  assert sweep[1]["mean_length"] < sweep[0]["mean_length"] and sweep[1]["accuracy"] >= sweep[0]["accuracy"]
  assert report["length_tokens"]["shortening"][0]["token"] == 1  # EOS ends the continuation.
  assert "equal_to" in printed
