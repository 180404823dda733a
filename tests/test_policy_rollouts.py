"""Policy -> rollouts -> LenVM, on CPU at tiny size: train an LM-only policy on the synthetic generator, sample
rollouts with experiments.generate, train a LenVM on those ArrayRecord shards, predict with it.

The synthetic prompts carry a mode token that sets the stop probability (0.05 vs 0.3 per token), so a policy that
learned anything writes longer completions for mode-0 prompts, and a LenVM trained on its rollouts must predict
longer remaining lengths at those prompts' boundary.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from experiments.configs import policy_synthetic, tiny
from lenvm_jax.model import transformer
from lenvm_jax import sharding
from lenvm_jax.data import arrayrecord, pipeline, rows as rows_lib
from lenvm_jax.data.synthetic import EOS_ID, SyntheticPolicy
from lenvm_jax.decoding import policy as policy_lib, rollouts
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.sampler import SamplingConfig
from lenvm_jax.value.objective import Objective
from lenvm_jax import config as config_lib
from lenvm_jax.train import state as state_lib, step as step_lib, trainer
from tests.helpers import REPO, run_config

# 128 prompts, not fewer: with 48 the LenVM-beats-the-constant check passed on 2 of 4 sampling seeds (a coin flip on
# 48 eval rollouts); with 128 it passed on both seeds tried that had failed (value MSE ~17 % under the constant's).
NUM_PROMPTS, NUM_SAMPLES, MAX_NEW = 128, 4, 32
SAMPLING_FLAGS = ["--temperature=1.0", "--top_k=40", "--top_p=0.95", "--min_p=0.01", "--seed=3"]


def mode_of(prompt_id: str) -> int:
  return int(prompt_id.rsplit("mode", 1)[1])


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("policy_rollouts")
  # 1. An LM-only policy.
  config = policy_synthetic.get_config()
  config.mesh.data = 1
  trainer.train_and_evaluate(run_config(config), str(root / "policy"))
  # 2. Prompts from the synthetic generator, with their mode in the prompt id.
  generator = SyntheticPolicy(vocab_size=64, hazards=tuple(config.data.synthetic.hazards))
  rng = np.random.default_rng(7)
  prompts = {}
  with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
    for i in range(NUM_PROMPTS):
      mode = i % 2
      prompt = generator.sample(rng).prompt_ids
      prompt[prompt < generator.first_filler] = generator.first_filler  # Only the one mode token below fillers.
      prompt[rng.integers(len(prompt))] = generator.mode_token(mode)
      prompts[f"q{i}-mode{mode}"] = prompt.tolist()
      f.write(json.dumps({"prompt_ids": prompt.tolist(), "prompt_id": f"q{i}-mode{mode}"}) + "\n")
  # 3. Rollouts through the CLI.
  out = root / "rollouts"
  command = [sys.executable, "-m", "experiments.generate", f"--policy={root / 'policy'}",
             f"--prompts={root / 'prompts.jsonl'}", f"--output_dir={out}", "--eos_ids=1",
             f"--num_samples={NUM_SAMPLES}", f"--max_new_tokens={MAX_NEW}", "--batch_size=32", "--shard_size=64",
             "--eval_fraction=0.25", "--mesh=1,1,1", *SAMPLING_FLAGS]
  run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  # 4. A LenVM on the rollouts.
  lenvm = tiny.get_config()
  lenvm.data.source = "arrayrecord"
  lenvm.data.train_path = str(out / "train")
  lenvm.data.eval_path = str(out / "eval")
  lenvm.train.steps = 120
  lenvm.train.eval_every = 0
  lenvm.optim.lr = 3e-3
  lenvm.mesh.data = 1
  lenvm.checkpoint.every_steps = 120
  final_eval = trainer.train_and_evaluate(run_config(lenvm), str(root / "lenvm"))
  return root, prompts, run, final_eval


def read_records(directory):
  records = []
  for path in sorted(directory.glob("*.array_record")):
    reader = ArrayRecordReader(str(path))
    records += [(path.name.split("-")[0], json.loads(r)) for r in reader.read_all()]
    reader.close()
  return records


@pytest.mark.slow
def test_rollout_shards_hold_every_sample_with_truthful_flags(pipeline_run):
  root, prompts, run, _ = pipeline_run
  records = read_records(root / "rollouts")
  assert len(records) == NUM_PROMPTS * NUM_SAMPLES
  stats = json.loads((root / "rollouts" / "stats.json").read_text())
  assert sum(stats["records"].values()) == len(records) and stats["records"]["eval"] > 0
  assert f"train: {stats['records']['train']} records" in run.stdout
  samples = {}
  for split, r in records:
    completion = r["completion_ids"]
    assert r["prompt_ids"] == prompts[r["prompt_id"]]
    assert r["generator"] == "policy"
    assert r["finished"] == (completion[-1] == EOS_ID)  # Finished exactly when it ends with EOS ...
    assert EOS_ID not in completion[:-1]  # ... and nothing follows an EOS.
    assert 1 <= len(completion) <= MAX_NEW and (r["finished"] or len(completion) == MAX_NEW)
    assert r["meta"]["top_k"] == 40 and r["meta"]["top_p"] == 0.95 and r["meta"]["eos_ids"] == [EOS_ID]
    samples.setdefault(r["prompt_id"], set()).add((split, r["meta"]["sample"]))
  for prompt_id, seen in samples.items():  # Every prompt's samples share one split.
    assert len(seen) == NUM_SAMPLES and len({split for split, _ in seen}) == 1, prompt_id
  # The data path reads the same trajectories back.
  source = arrayrecord.ArrayRecordTrajectories(str(root / "rollouts" / "train"))
  assert len(source) == stats["records"]["train"]
  assert all(source[i].finished == (source[i].completion_ids[-1] == EOS_ID) for i in range(len(source)))


@pytest.mark.slow
def test_the_policy_learned_the_prompt_dependent_stop_rate(pipeline_run):
  root, _, _, _ = pipeline_run
  lengths = {0: [], 1: []}
  for _, r in read_records(root / "rollouts"):
    lengths[mode_of(r["prompt_id"])].append(len(r["completion_ids"]))
  # Generator: ~20 tokens in mode 0 (capped at 32 here), ~3.3 in mode 1. A policy that ignored the prompt would
  # give both the same mean.
  assert np.mean(lengths[0]) > 2 * np.mean(lengths[1]), {k: np.mean(v) for k, v in lengths.items()}


@pytest.mark.slow
def test_lenvm_trained_on_rollouts_beats_the_constant_and_ranks_prompts(pipeline_run):
  root, _, _, final_eval = pipeline_run
  assert final_eval["value_mse"] < final_eval["const_value_mse"], final_eval
  source = arrayrecord.ArrayRecordTrajectories(str(root / "rollouts" / "*.array_record"))
  trajectories = [source[i] for i in range(len(source))]
  predictions = Predictor(str(root / "lenvm")).predict(trajectories, batch_size=32)
  at_prompt = {0: [], 1: []}
  for trajectory, (values, remaining) in zip(trajectories, predictions):
    assert len(values) == len(trajectory.completion_ids) + 1
    assert np.all(np.isfinite(values)) and np.all((values > -1) & (values <= 0))
    at_prompt[mode_of(trajectory.prompt_id)].append(remaining[0])
  assert np.mean(at_prompt[0]) > np.mean(at_prompt[1]), {k: np.mean(v) for k, v in at_prompt.items()}


@pytest.mark.slow
def test_rerun_skips_finished_shards_and_regenerates_missing_ones_identically(pipeline_run, tmp_path):
  root, _, _, _ = pipeline_run
  out = root / "rollouts"
  mesh = sharding.make_mesh(1, 1, 1)
  policy = policy_lib.load_policy(str(root / "policy"), mesh)
  from lenvm_jax.data import prompts as prompts_lib
  prompts = prompts_lib.read_prompt_jsonl(str(root / "prompts.jsonl"), 64)
  settings = json.loads((out / "generation.json").read_text())
  sampling = SamplingConfig(**{**settings["sampling"], "eos_ids": tuple(settings["sampling"]["eos_ids"])})
  kwargs = dict(num_samples=NUM_SAMPLES, generator="policy", shard_size=64, eval_fraction=0.25,
                settings={k: settings[k] for k in ("policy", "prompts", "sampling")})
  shards = sorted(out.glob("train-*.array_record"))
  before = {p.name: p.read_bytes() for p in shards}
  kept_mtime = shards[0].stat().st_mtime_ns
  shards[-1].unlink()
  # Another batch size: a sample does not depend on its batch, so the regenerated shard is byte-identical.
  rollouts.generate_rollouts(Sampler(policy.graphdef, policy.params, sampling, mesh, batch_size=16), prompts,
                             str(out), **kwargs)
  assert {p.name: p.read_bytes() for p in sorted(out.glob("train-*.array_record"))} == before
  assert shards[0].stat().st_mtime_ns == kept_mtime
  with pytest.raises(ValueError, match="num_samples"):
    rollouts.generate_rollouts(Sampler(policy.graphdef, policy.params, sampling, mesh, batch_size=16), prompts,
                               str(out), **{**kwargs, "num_samples": 2})


@pytest.mark.slow
def test_lm_only_loss_is_the_token_mean_cross_entropy_and_leaves_the_value_head(tiny_config):
  config = tiny_config
  config.loss.value_weight, config.loss.lm_weight = 0.0, 1.0
  model_config = run_config(config).model
  objective = Objective.from_config(run_config(config).loss)
  graphdef, _ = transformer.abstract_model(model_config)
  source = pipeline.load_source(run_config(config), "train")
  rows = [rows_lib.pad_row(rows_lib.trajectory_to_row(source[i], config.data.max_len), config.data.max_len)
          for i in range(8)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}

  @jax.jit
  def loss_and_grads(params):
    def loss(params):
      z, lm_head, _ = step_lib.forward_heads(graphdef, params, batch, freeze_trunk=False, objective=objective)
      value_count, lm_count = objective.token_counts(batch)
      lm_logits = transformer.lm_logits(lm_head.hidden, lm_head.weight)
      return objective.loss(objective.sums(z, lm_head, batch), value_count, lm_count), lm_logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, logits), grads = loss_and_grads(jax.jit(lambda: transformer.init_params(model_config, 0))())
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["lm_targets"])
  mask = batch["lm_mask"]
  assert float(loss) == pytest.approx(float(jnp.sum(ce * mask) / jnp.sum(mask)), rel=1e-6)
  assert all(not np.any(g) for g in jax.tree.leaves(grads["value_head"]))
  assert np.any(grads["embedding"]) and np.any(grads["lm_head"])


def test_nothing_to_train_is_a_config_error(tiny_config):
  tiny_config.loss.value_weight = 0.0
  with pytest.raises(config_lib.ConfigError, match="loss.value_weight"):
    run_config(tiny_config).model
