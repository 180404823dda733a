"""Training-data knobs of the paper's figures: synthetic prompts with several samples, deterministic subsets of
prompts and samples (data.max_prompts / data.samples_per_prompt), and prompt-grouped batching (data.batching)."""

import dataclasses

import numpy as np
import pytest

from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import pipeline, subsets
from lenvm_jax.data.records import Trajectory
from lenvm_jax.data.synthetic import SyntheticPolicy, SyntheticSource


def _run(batching="shuffled", max_prompts=0, samples_per_prompt=0, synthetic_samples=4, records=96):
  run = RunConfig.default("tiny")
  data = dataclasses.replace(
      run.data, batching=batching, max_prompts=max_prompts, samples_per_prompt=samples_per_prompt, packing="none",
      max_len=48, synthetic=dataclasses.replace(run.data.synthetic, samples_per_prompt=synthetic_samples,
                                                train_records=records, hazards=(0.05, 0.3)))
  return dataclasses.replace(run, data=data, train=dataclasses.replace(run.train, batch_size=8))


def test_synthetic_prompts_with_several_samples():
  policy = SyntheticPolicy()
  grouped = SyntheticSource(policy, 12, seed=3, gamma=None, samples_per_prompt=4)
  records = [grouped[i] for i in range(12)]
  for group in range(3):
    members = records[4 * group:4 * group + 4]
    assert {r.prompt_id for r in members} == {f"synthetic-3-{group}"}
    assert all(np.array_equal(r.prompt_ids, members[0].prompt_ids) for r in members)
    assert len({tuple(r.completion_ids.tolist()) for r in members}) > 1  # Different completions.
  assert not np.array_equal(records[0].prompt_ids, records[4].prompt_ids)
  np.testing.assert_array_equal(grouped.group_ids(), np.repeat(np.arange(3), 4))
  # One sample per prompt: the records drawn before this option existed, byte for byte.
  single = SyntheticSource(policy, 5, seed=3, gamma=None)
  for i in range(5):
    expected = policy.sample(np.random.default_rng([3, i]))
    assert single[i].prompt_id is None
    np.testing.assert_array_equal(single[i].completion_ids, expected.completion_ids)
    np.testing.assert_array_equal(single[i].prompt_ids, expected.prompt_ids)


def test_record_groups_read_records_or_take_the_sources_ids():
  t = lambda prompt_id, generator="g": Trajectory(np.asarray([5], np.int32), np.asarray([1], np.int32), True,
                                                  prompt_id, generator)
  records = [t("b"), t("a"), t("b"), t("a", "h"), t("a")]
  groups = subsets.record_groups(records)
  assert [g.tolist() for g in groups] == [[0, 2], [1, 4], [3]]  # Order of first appearance; (prompt, generator).
  source = SyntheticSource(SyntheticPolicy(), 10, seed=0, gamma=None, samples_per_prompt=3)
  assert [g.tolist() for g in subsets.record_groups(source)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_subsets_are_seeded_nested_and_cut_samples_in_order():
  groups = [np.arange(4 * g, 4 * g + 4) for g in range(20)]
  five = subsets.select(groups, max_prompts=5, seed=1)
  ten = subsets.select(groups, max_prompts=10, seed=1)
  assert len(five) == 5 and len(ten) == 10
  assert {int(g[0]) for g in five} <= {int(g[0]) for g in ten}  # Nested.
  assert [g.tolist() for g in five] == [g.tolist() for g in subsets.select(groups, max_prompts=5, seed=1)]
  assert [g.tolist() for g in five] != [g.tolist() for g in subsets.select(groups, max_prompts=5, seed=2)]
  assert [int(g[0]) for g in five] == sorted(int(g[0]) for g in five)  # Original order kept.
  two = subsets.select(groups, samples_per_prompt=2)
  assert len(two) == 20 and all(g.tolist() == [4 * i, 4 * i + 1] for i, g in enumerate(two))
  assert [g.tolist() for g in subsets.select(groups)] == [g.tolist() for g in groups]


def test_the_training_split_is_cut_and_eval_is_not():
  run = _run(max_prompts=5, samples_per_prompt=3)
  train = pipeline.load_source(run, "train")
  assert len(train) == 15
  ids = [train[i].prompt_id for i in range(15)]
  assert len(set(ids)) == 5 and all(ids.count(i) == 3 for i in set(ids))
  assert len(pipeline.load_source(run, "eval")) == run.data.synthetic.eval_records


def test_grouped_order_lists_whole_groups_in_a_fresh_order_every_epoch():
  groups = [np.arange(3 * g, 3 * g + 3) for g in range(6)]
  order = subsets.GroupedOrder(groups, seed=0)
  epochs = [[order(j) for j in range(e * 18, (e + 1) * 18)] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(18))
    assert all(epoch[k] // 3 == epoch[k - k % 3] // 3 for k in range(18))  # Each group contiguous.
  assert epochs[0] != epochs[1]


def _prompt_rows(batch):
  """The prompt of each row (rows are not packed here): its first tokens up to the value mask."""
  return [tuple(row[:int(np.argmax(mask))].tolist()) for row, mask in zip(batch["tokens"], batch["value_mask"])]


def test_grouped_batches_hold_whole_prompt_groups_and_resume_exactly():
  run = _run(batching="grouped", synthetic_samples=4)
  source = pipeline.load_source(run, "train")
  iterator = iter(pipeline.train_dataset(run, source))
  first = [next(iterator) for _ in range(3)]
  for batch in first:  # 8 rows = two whole groups of 4 samples of one prompt.
    prompts = _prompt_rows(batch)
    assert len(set(prompts[:4])) == 1 and len(set(prompts[4:])) == 1 and prompts[0] != prompts[4]
  state = iterator.get_state()
  following = next(iterator)
  resumed = iter(pipeline.train_dataset(run, source))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], following["tokens"])
  shuffled = _prompt_rows(next(iter(pipeline.train_dataset(_run(), source))))
  assert len(set(shuffled)) > 2  # Shuffled records mix prompts.


@pytest.mark.parametrize("field, value", [("batching", "sorted"), ("max_prompts", -1), ("samples_per_prompt", -2)])
def test_data_knobs_are_checked(field, value):
  with pytest.raises(ConfigError, match=f"data.{field}"):
    RunConfig.from_dict({"model": RunConfig.default("tiny").to_dict()["model"], "data": {field: value}})
  with pytest.raises(ConfigError, match="data.synthetic.samples_per_prompt"):
    RunConfig.from_dict({"model": RunConfig.default("tiny").to_dict()["model"],
                         "data": {"synthetic": {"samples_per_prompt": 0}}})


def test_paper_config_holds_the_papers_hyperparameters():
  from experiments.configs import paper  # pylint: disable=g-import-not-at-top
  config = paper.get_config()
  config.data.train_path = "data/rollouts/train"
  run = RunConfig.from_dict(config)
  assert (run.optim.lr, run.optim.b1, run.optim.b2, run.optim.eps, run.optim.weight_decay) == (
      2e-5, 0.9, 0.999, 1e-8, 0.0)
  assert (run.optim.end_lr_fraction, run.train.batch_size, run.data.packing) == (0.0, 1024, "none")
  assert (run.model.dtype, run.model.vocab_size, run.model.hidden_size) == ("bfloat16", 151936, 1536)
  assert run.loss.gamma == 0.997 and run.train.steps == 2 * 262_144 // 1024
  small = paper.get_config("small")  # Shapes from another preset; its vocabulary stays the base's.
  assert (small.model.hidden_size, small.model.vocab_size) == (64, 64)
