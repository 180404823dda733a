"""grain pipeline: exact resume with worker processes, ArrayRecord shards as a training source, gamma = "auto"."""

import pytest
import json

import jax.numpy as jnp
import numpy as np

from lenvm_jax.data import arrayrecord, pipeline, prepare, prompt_groups
from lenvm_jax import config as config_lib
from lenvm_jax.train import checkpointing, trainer
from lenvm_jax.value import gamma as gamma_lib
from tests.helpers import run_config


@pytest.mark.slow
def test_resume_mid_epoch_with_worker_processes_gives_the_same_batches(tiny_config, tmp_path):
  config = tiny_config
  config.data.worker_count = 2
  config.data.synthetic.train_records = 300  # ~40 batches per epoch: the stop below is mid-epoch.
  source = pipeline.load_source(run_config(config), "train")

  straight = iter(pipeline.train_dataset(run_config(config), source))
  expected = [next(straight) for _ in range(14)]
  straight.close()

  interrupted = iter(pipeline.train_dataset(run_config(config), source))
  for _ in range(9):
    next(interrupted)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
  ckpt.save(9, {"x": jnp.zeros(1)}, interrupted, force=True)
  ckpt.wait()
  interrupted.close()

  resumed = iter(pipeline.train_dataset(run_config(config), source))
  ckpt.restore(9, {"x": jnp.zeros(1)}, resumed)
  ckpt.close()
  for want in expected[9:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  resumed.close()


def _write_shards(config, directory):
  """The synthetic trajectories, imported through prepare() like any other data."""
  records = []
  for split in ("train", "eval"):
    source = pipeline.load_source(run_config(config), split)
    n = 600 if split == "train" else 48
    records += [prepare.ImportedRecord(split, source[i], "synthetic", i + 1) for i in range(n)]
  return prepare.prepare(records, str(directory), vocab_size=config.model.vocab_size, max_len=config.data.max_len,
                         shard_size=256)


@pytest.mark.slow
def test_arrayrecord_shards_train_with_auto_gamma_and_workers(tiny_config, tmp_path):
  config = tiny_config
  summary = _write_shards(config, tmp_path / "data")
  assert summary["shards"] == {"train": 3, "eval": 1}
  shards = arrayrecord.ArrayRecordTrajectories(str(tmp_path / "data" / "train"))
  assert len(shards) == 600
  original = pipeline.load_source(run_config(config), "train")[5]
  np.testing.assert_array_equal(shards[5].completion_ids, original.completion_ids)

  config.data.source = "arrayrecord"
  config.data.train_path = str(tmp_path / "data" / "train")
  config.data.eval_path = str(tmp_path / "data" / "eval")
  config.data.worker_count = 2
  config.loss.gamma = "auto"
  config.train.steps = 4
  config.train.eval_every = 0
  config.mesh.data = 1
  final_eval = trainer.train_and_evaluate(run_config(config), str(tmp_path / "run"))
  assert np.isfinite(final_eval["value_mse"]) and "bayes_value_mse" not in final_eval
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  p99 = np.percentile([len(shards[i].completion_ids) for i in range(len(shards))], 99)
  assert saved["loss"]["gamma"] == gamma_lib.p99_gamma(p99)
  assert abs((1 - saved["loss"]["gamma"] ** p99) - 0.99) < 1e-9  # Spec: 1 - gamma ** L_p99 = 0.99.


def test_auto_mre_gamma_is_resolved_from_the_training_split(tiny_config):
  tiny_config.loss.gamma = "auto_mre"
  run = run_config(tiny_config)
  resolved, source = trainer.resolve_gamma(run)
  gamma = resolved.loss.gamma
  policy = pipeline.synthetic_policy(run)
  sample = [policy.sample(np.random.default_rng([tiny_config.data.seed * 2, i]))
            for i in range(tiny_config.data.synthetic.train_records)]
  assert gamma == gamma_lib.least_mre_gamma(prompt_groups.group_by_prompt(sample))[0]
  assert source[0].exact_values is not None  # The synthetic source is drawn again under the resolved gamma.
  tiny_config.loss.gamma = "auto"
  assert gamma_lib.resolve(run_config(tiny_config), sample).loss.gamma != gamma


def test_length_normalizer_zero_is_the_longest_training_completion(tiny_config):
  tiny_config.loss.target_type = "normalized_length"
  tiny_config.loss.gamma = 0.97
  run = run_config(tiny_config)
  assert run.loss.length_normalizer == 0 and not run.loss.resolved
  resolved, source = trainer.resolve_gamma(run)
  longest = max(len(t.completion_ids) for t in pipeline.length_sample(source))
  assert resolved.loss.length_normalizer == longest and resolved.loss.gamma == 0.97 and resolved.loss.resolved
  tiny_config.loss.length_normalizer = 300.0  # Set by hand: kept.
  assert trainer.resolve_gamma(run_config(tiny_config))[0].loss.length_normalizer == 300.0


@pytest.mark.slow
def test_tfds_builder_round_trip_and_training_without_tensorflow(tiny_config, tmp_path):
  import importlib.util
  assert importlib.util.find_spec("tensorflow") is None  # The point: TFDS's array_record path needs no TF.
  from lenvm_jax.data.tfds_builder import LenvmTrajectories, TfdsTrajectories
  config = tiny_config
  _write_shards(config, tmp_path / "data")
  LenvmTrajectories(data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "data")).download_and_prepare()
  for split, count in (("train", 600), ("eval", 48)):
    shards = arrayrecord.ArrayRecordTrajectories(str(tmp_path / "data" / split))
    view = TfdsTrajectories("lenvm_trajectories", split, str(tmp_path / "tfds"))
    assert len(view) == count
    key = lambda t: (tuple(t.prompt_ids.tolist()), tuple(t.completion_ids.tolist()), t.finished)
    assert sorted(map(key, (view[i] for i in range(count)))) == sorted(map(key, (shards[i] for i in range(count))))

  config.data.source = "tfds"
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  config.train.steps = 3
  config.train.eval_every = 0
  config.mesh.data = 1
  final_eval = trainer.train_and_evaluate(run_config(config), str(tmp_path / "run"))
  assert np.isfinite(final_eval["value_mse"])
