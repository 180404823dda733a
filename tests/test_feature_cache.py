"""train.feature_cache: the frozen layers' output computed once per record gives the full forward's loss and gradients
(float32, packed rows), a cache of other weights or records is refused, and a run trains and resumes on it."""

import json
import logging
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lenvm_jax import sharding
from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.model import transformer
from lenvm_jax.train import feature_cache, optimizer, state as state_lib, step as step_lib, trainer
from lenvm_jax.value.objective import Objective


def _run(**changes) -> RunConfig:
  config = RunConfig.default("tiny").to_dict()
  config["model"].update(num_layers=3, dtype="float32")
  config["data"].update(max_len=48, packing="first_fit")
  config["data"]["synthetic"].update(train_records=96, hazards=(0.05, 0.3))
  config["train"].update(trainable_layers=1, feature_cache="auto", feature_cache_dtype="float32", batch_size=4,
                         eval_batch_size=8)
  config["loss"].update(gamma=0.97, lm_weight=0.5)
  for section, fields in changes.items():
    config[section].update(fields)
  return RunConfig.from_dict(config)


def _state(run: RunConfig, seed: int = 0):
  _, abstract = transformer.abstract_model(run.model)
  tx = optimizer.make_optimizer(run, abstract.to_pure_dict())
  state, _ = state_lib.create_train_state(run.model, tx, sharding.make_mesh(1, 1, 1), seed=seed)
  return state


def _ready(run: RunConfig, params, path, source=None):
  cache = feature_cache.FeatureCache(run, str(path), source or pipeline.load_source(run, "train"))
  cache.ready(params, sharding.make_mesh(1, 1, 1))
  return cache


@pytest.mark.parametrize("train, frozen_layers", [({}, 2), ({"trainable_layers": 0, "freeze_trunk": True}, 3)])
def test_cached_features_give_the_full_forward_loss_and_gradients(tmp_path, train, frozen_layers):
  """K = 1 of 3 layers trains (2 cached), or freeze_trunk (all 3 cached, only the final norm and heads run)."""
  run = _run(train=train)
  assert feature_cache.frozen_layers(run) == frozen_layers
  state = _state(run)
  source = pipeline.load_source(run, "train")
  cache = _ready(run, state.params, tmp_path, source)
  plain = next(iter(pipeline.train_dataset(run, source)))
  cached = next(iter(pipeline.train_dataset(run, source, cache.reader)))
  assert set(cached) == set(plain) | {pipeline.FEATURES}
  for name, value in plain.items():  # The same packed rows, with the features travelling along.
    np.testing.assert_array_equal(cached[name], value)
  assert cached[pipeline.FEATURES].shape == plain["tokens"].shape + (run.model.hidden_size,)
  assert plain["segment_ids"].max() >= 2  # Several records share a row.
  assert not np.any(cached[pipeline.FEATURES][plain["segment_ids"] == 0])

  graphdef, _ = transformer.abstract_model(run.model)
  objective = Objective.from_config(run.loss)
  frozen = step_lib.frozen_layers(run.train, state.params)
  freeze_trunk = run.train.freeze_trunk

  @jax.jit
  def loss_and_grads(params, batch):
    value_count, lm_count = objective.token_counts(batch)
    def loss(p):
      z, lm_head, candidate_z = step_lib.forward_heads(graphdef, p, batch, freeze_trunk=freeze_trunk,
                                                       objective=objective, frozen_layers=frozen)
      return objective.loss(objective.sums(z, lm_head, batch, candidate_z), value_count, lm_count, None)
    return jax.value_and_grad(loss)(params)

  full_loss, full = loss_and_grads(state.params, {k: jnp.asarray(v) for k, v in plain.items()})
  cached_loss, grads = loss_and_grads(state.params, {k: jnp.asarray(v) for k, v in cached.items()})
  assert float(cached_loss) == pytest.approx(float(full_loss), rel=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  cached_layers = 3 - run.train.trainable_layers  # The top layer trains; the cached ones get zeros.
  assert all(np.any(np.asarray(x[cached_layers:])) for x in jax.tree.leaves(grads["layers"])) or freeze_trunk
  assert not any(np.any(np.asarray(x[:cached_layers])) for x in jax.tree.leaves(grads["layers"]))
  assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(grads["value_head"]))


def test_manifest_states_the_disk_cost_and_bfloat16_halves_it(tmp_path):
  run = _run(train={"feature_cache_dtype": "bfloat16"})
  state = _state(run)
  cache = _ready(run, state.params, tmp_path)
  manifest = json.loads((tmp_path / "feature_cache" / "cache.json").read_text())
  assert manifest["bytes"] == manifest["tokens"] * run.model.hidden_size * 2
  assert manifest["cached_records"] == 96
  features = cache.reader[0]
  assert features.dtype == jnp.bfloat16 and features.shape[1] == run.model.hidden_size
  exact = _ready(_run(), state.params, tmp_path / "f32").reader[0]
  np.testing.assert_array_equal(features, exact.astype(jnp.bfloat16))
  # A grain worker process gets a pickled reader (maybe before the trainer attached it): it reads from disk alone.
  unattached = feature_cache.FeatureReader(cache.path)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(unattached))[0], features)


def test_a_cache_of_other_weights_or_records_is_refused_and_the_top_layers_do_not_matter(tmp_path):
  run = _run()
  state = _state(run)
  _ready(run, state.params, tmp_path)
  top_changed = dict(state.params)
  top_changed["layers"] = jax.tree.map(lambda a: a.at[-1].add(1.0), state.params["layers"])
  top_changed["value_head"] = jax.tree.map(lambda a: a + 1.0, state.params["value_head"])
  _ready(run, top_changed, tmp_path)  # Only the trained part changed: the cache still holds.
  with pytest.raises(ConfigError, match=r"config.train.feature_cache_dir: .* stale: its frozen weights .* differ"):
    _ready(run, _state(run, seed=1).params, tmp_path)
  with pytest.raises(ConfigError, match=r"feature_cache_dir: .* stale: built from other records .*record \d+ differs"):
    _ready(_run(data={"max_prompt_len": 4}), state.params, tmp_path)
  with pytest.raises(ConfigError, match=r"other records .*96 records, this run's split 64"):
    _ready(_run(data={"synthetic": {"train_records": 64, "hazards": (0.05, 0.3)}}), state.params, tmp_path)
  with pytest.raises(ConfigError, match=r"number of frozen layers differs .*\(2, this run 1\)"):
    _ready(_run(train={"trainable_layers": 2}), state.params, tmp_path)


def test_dropout_in_frozen_layers_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config.train.feature_cache: .*dropout_rate"):
    feature_cache.for_run(_run(model={"dropout_rate": 0.1}), "unused", [])
  assert feature_cache.for_run(_run(train={"trainable_layers": 0}), "unused", []) is None
  assert feature_cache.for_run(_run(train={"feature_cache": "off"}), "unused", []) is None


STEPS = 4


def _train(workdir, tiny_config, seed: int | None = None, cache_dir: str | None = None):
  """The trainer in this process (the run, not the CLI, is under test): the tiny config, K = 1 on the cache, 2 x 8
  packed rows over the 8 devices, a checkpoint every 2 steps."""
  config = tiny_config.copy_and_resolve_references()
  config.train.update(steps=STEPS, eval_every=0, trainable_layers=1, feature_cache="auto", accum_steps=2,
                      batch_size=16)
  config.checkpoint.every_steps = 2
  config.data.synthetic.train_records = 256
  config.data.packing = "first_fit"
  if seed is not None:
    config.seed = seed
  if cache_dir is not None:
    config.train.feature_cache_dir = cache_dir
  return trainer.train_and_evaluate(RunConfig.from_dict(config), str(workdir))


def _params_at(workdir, step):
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data_iter"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return state["params"]


@pytest.mark.slow  # Three trainer runs (one refused before its first step).
def test_a_run_trains_on_the_cache_resumes_on_it_and_refuses_a_stale_one(tmp_path, tiny_config, caplog):
  workdir = tmp_path / "run"
  with caplog.at_level(logging.INFO):
    _train(workdir, tiny_config)
  assert "feature cache: 256 records" in caplog.text
  straight = _params_at(workdir, STEPS)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # Back to step 2: the rerun resumes there, on the same cache.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    _train(workdir, tiny_config)
  assert "feature cache: reusing" in caplog.text and "resuming from checkpoint step 2" in caplog.text
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(_params_at(workdir, STEPS))):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  # A user error (the CLIs print it as one line, exit 2), raised before any step.
  with pytest.raises(ConfigError, match=r"config.train.feature_cache_dir: .* stale: its frozen weights"):
    _train(tmp_path / "other", tiny_config, seed=7, cache_dir=str(workdir / "feature_cache"))


def test_a_stopped_build_goes_on_from_its_last_whole_chunk_and_equals_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                           caplog):
  """A 46-minute build stopped by a kill or a session's end keeps its whole chunks: started again, it computes only
  the rest, and every record's features equal those of a build that was never stopped."""
  monkeypatch.setattr(feature_cache, "SHARD_BYTES", 1)  # One chunk per forward (8 records): 12 chunks.
  run = _run()
  state = _state(run)
  whole = _ready(run, state.params, tmp_path / "whole")

  class StoppedAfter40(feature_cache.progress.ProgressLine):
    def update(self, done, *args, **kwargs):
      if done > 40:
        raise KeyboardInterrupt
      return super().update(done, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(feature_cache.progress, "ProgressLine", StoppedAfter40)
    with pytest.raises(KeyboardInterrupt):
      _ready(run, state.params, tmp_path / "stopped")
  assert not (tmp_path / "stopped" / "feature_cache" / "cache.json").exists()
  counted = []

  class Counted(feature_cache.progress.ProgressLine):
    def update(self, done, *args, **kwargs):
      counted.append(done)
      return super().update(done, *args, **kwargs)

  with caplog.at_level(logging.INFO), monkeypatch.context() as patch:
    patch.setattr(feature_cache.progress, "ProgressLine", Counted)
    resumed = _ready(run, state.params, tmp_path / "stopped")
  assert "going on from 40 of 96 records" in caplog.text
  assert counted[0] == 48 and counted[-1] == 96  # Only records 40 - 95 ran through the frozen layers.
  assert not (tmp_path / "stopped" / "feature_cache" / feature_cache.PARTIAL).exists()
  for i in range(96):
    np.testing.assert_array_equal(resumed.reader[i], whole.reader[i])
  # Other weights: the stopped build's chunks are not reused.
  other = _state(run, seed=1)
  with monkeypatch.context() as patch:
    patch.setattr(feature_cache.progress, "ProgressLine", StoppedAfter40)
    with pytest.raises(KeyboardInterrupt):
      _ready(run, other.params, tmp_path / "other")
  caplog.clear()
  with caplog.at_level(logging.INFO):
    _ready(run, state.params, tmp_path / "other")
  assert "starting over" in caplog.text and "going on" not in caplog.text
