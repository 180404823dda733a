import json

import numpy as np
import pytest

from lenvm_jax.config import ConfigError
from lenvm_jax.data import jsonl, pipeline, rows, synthetic
from lenvm_jax.data.records import RecordError, Trajectory
from tests.helpers import run_config


def test_row_targets_mask_and_truncation_keep_true_remaining_lengths():
  t = Trajectory(np.array([5, 6, 7], np.int32), np.array([8, 9, 10, 11, 1], np.int32))
  row = rows.pad_row(rows.trajectory_to_row(t, max_len=6), 6)
  # Value positions: the prompt's last token (index 2) through EOS; cut at 6 tokens, remaining stays true (L=5).
  np.testing.assert_array_equal(row["value_mask"], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(row["remaining"], [0, 0, 5, 4, 3, 2])
  np.testing.assert_array_equal(row["completion_index"], [-1, -1, 0, 1, 2, 3])
  np.testing.assert_array_equal(row["completion_length"], [0, 0, 5, 5, 5, 5])
  np.testing.assert_array_equal(row["lm_targets"][2:5], [8, 9, 10])
  np.testing.assert_array_equal(row["lm_mask"], [0, 0, 1, 1, 1, 0])
  full = rows.pad_row(rows.trajectory_to_row(t, max_len=10), 10)
  np.testing.assert_array_equal(full["remaining"][2:8], [5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(full["segment_ids"], [1] * 8 + [0, 0])


def test_unfinished_policies():
  t = Trajectory(np.array([5, 6], np.int32), np.array([8, 9, 10], np.int32), finished=False)
  assert rows.trajectory_to_row(t, 10, "infinite")["remaining"][1:].tolist() == [-1, -1, -1, -1]
  assert rows.trajectory_to_row(t, 10, "as_finished")["remaining"][1:].tolist() == [3, 2, 1, 0]


def test_append_eos_gives_the_appended_eos_n_zero_like_the_reference_template():
  """The reference's template ends a cut answer with EOS: the last generated token has one step left, EOS none."""
  t = Trajectory(np.array([5, 6], np.int32), np.array([8, 9, 10], np.int32), finished=False,
                 exact_values=np.array([-0.5, -0.4, -0.3, -0.2], np.float32))
  row = rows.trajectory_to_row(t, 10, "append_eos", eos_id=1)
  np.testing.assert_array_equal(row["tokens"], [5, 6, 8, 9, 10, 1])
  np.testing.assert_array_equal(row["value_mask"], [0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(row["remaining"], [0, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(row["completion_index"], [-1, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(row["completion_length"], [0, 4, 4, 4, 4, 4])
  np.testing.assert_array_equal(row["lm_targets"], [6, 8, 9, 10, 1, 0])
  np.testing.assert_array_equal(row["lm_mask"], [0, 1, 1, 1, 1, 0])  # The appended EOS is an LM target too.
  np.testing.assert_allclose(row["exact_value"], [0, -0.5, -0.4, -0.3, -0.2, 0])
  # Cut at max_len: the true remaining lengths count the appended EOS.
  np.testing.assert_array_equal(rows.trajectory_to_row(t, 4, "append_eos", eos_id=1)["remaining"], [0, 4, 3, 2])
  # A finished completion already ends with its EOS: nothing is appended.
  done = Trajectory(np.array([5, 6], np.int32), np.array([8, 1], np.int32))
  np.testing.assert_array_equal(rows.trajectory_to_row(done, 10, "append_eos", eos_id=1)["tokens"], [5, 6, 8, 1])
  with pytest.raises(ValueError, match="data.eos_id"):
    rows.trajectory_to_row(t, 10, "append_eos")


def test_append_eos_config_needs_an_eos_id_inside_the_vocabulary(tiny_config):
  tiny_config.data.unfinished = "append_eos"
  with pytest.raises(ConfigError, match=r"config\.data\.eos_id: must be a token id >= 0 when"):
    run_config(tiny_config)
  tiny_config.data.eos_id = tiny_config.model.vocab_size
  with pytest.raises(ConfigError, match=r"config\.data\.eos_id: must lie inside the vocabulary"):
    run_config(tiny_config)
  tiny_config.data.eos_id = 1
  tiny_config.data.packing = "none"
  run = run_config(tiny_config)
  # The pipeline hands the policy and the id to the rows: the cut completion's first row ends with the EOS.
  cut = Trajectory(np.array([5, 6], np.int32), np.array([8, 9, 10], np.int32), finished=False)
  batch = next(pipeline.eval_batches(run, [cut]))
  np.testing.assert_array_equal(batch["tokens"][0, :7], [5, 6, 8, 9, 10, 1, 0])
  np.testing.assert_array_equal(batch["remaining"][0, :7], [0, 4, 3, 2, 1, 0, 0])


def test_synthetic_exact_values_match_monte_carlo():
  """V(s_t) computed by the policy equals the empirical mean return of rollouts continued from the same state."""
  policy = synthetic.SyntheticPolicy(vocab_size=40, hazards=(0.02, 0.2), switch_prob=0.1)
  gamma = 0.95
  values = policy.mode_values(gamma)
  rng = np.random.default_rng(0)
  for mode in range(policy.num_modes):
    returns = []
    for _ in range(20000):
      m, n = mode, 0
      while True:  # Continue the policy from a non-terminal state in mode m until EOS.
        n += 1
        if rng.random() < policy.hazards[m]:
          break
        if rng.random() < policy.switch_prob:
          m = int(rng.integers(policy.num_modes))
      returns.append(-(1 - gamma**n))
    assert np.mean(returns) == pytest.approx(values[mode], abs=3 * np.std(returns) / np.sqrt(len(returns)))


def test_synthetic_records_are_reproducible_and_carry_exact_values():
  source = synthetic.SyntheticSource(synthetic.SyntheticPolicy(vocab_size=32), 10, seed=3, gamma=0.9)
  a, b = source[4], source[4]
  np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
  assert a.finished and a.completion_ids[-1] == synthetic.EOS_ID
  assert len(a.exact_values) == len(a.completion_ids) + 1 and a.exact_values[-1] == 0.0
  assert ((a.prompt_ids >= 2) & (a.prompt_ids < 32)).all()


def _write(tmp_path, lines):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


GOOD = json.dumps({"prompt_ids": [3, 4], "completion_ids": [5, 1]})
BAD_LINES = {
    "not json": ("{'prompt_ids': [1]", "<json>"),
    "missing completion": (json.dumps({"prompt_ids": [3]}), "completion_ids"),
    "empty completion": (json.dumps({"prompt_ids": [3], "completion_ids": []}), "completion_ids"),
    "id out of vocab": (json.dumps({"prompt_ids": [3, 99], "completion_ids": [1]}), "prompt_ids"),
    "negative id": (json.dumps({"prompt_ids": [3], "completion_ids": [-2]}), "completion_ids"),
    "non-integer id": (json.dumps({"prompt_ids": [3, "a"], "completion_ids": [1]}), "prompt_ids"),
    "bad finished": (json.dumps({"prompt_ids": [3], "completion_ids": [1], "finished": "yes"}), "finished"),
    "unknown field": (json.dumps({"prompt_ids": [3], "completion_ids": [1], "extra": 1}), "extra"),
    "prompt too long": (json.dumps({"prompt_ids": list(range(2, 12)), "completion_ids": [1]}), "prompt_ids"),
    "not an object": ("[1, 2]", "<record>"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_lines_name_file_line_and_field(tmp_path, case):
  line, field = BAD_LINES[case]
  path = _write(tmp_path, [GOOD, "", line, GOOD])
  with pytest.raises(RecordError) as error:
    jsonl.read_trajectories(path, vocab_size=50, max_len=8)
  assert error.value.line == 3 and error.value.field == field
  assert f"{path}:3:" in str(error.value) and field in str(error.value)


def test_jsonl_reads_good_records(tmp_path):
  path = _write(tmp_path, [GOOD, json.dumps({"prompt_ids": [7], "completion_ids": [8, 9], "finished": False,
                                             "prompt_id": 12, "generator": "g"})])
  records = jsonl.read_trajectories(path, vocab_size=50, max_len=8)
  assert len(records) == 2 and records[1].prompt_id == "12" and not records[1].finished


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "none"])
def test_packed_rows_reproduce_every_trajectory(tiny_config, packing):
  """Packing keeps every trajectory's tokens, positions, remaining lengths and mask, each in its own segment."""
  config = tiny_config
  config.data.packing = packing
  source = pipeline.load_source(run_config(config), "eval")
  expected = {}
  for i in range(len(source)):
    r = rows.trajectory_to_row(source[i], config.data.max_len)
    expected[tuple(r["tokens"].tolist())] = r
  found = 0
  for batch in pipeline.eval_batches(run_config(config), source):
    for b in range(len(batch["tokens"])):
      for seg in set(batch["segment_ids"][b].tolist()) - {0}:
        where = batch["segment_ids"][b] == seg
        want = expected[tuple(batch["tokens"][b][where].tolist())]
        for key in ("positions", "remaining", "value_mask", "completion_index", "lm_targets", "lm_mask"):
          np.testing.assert_array_equal(batch[key][b][where], want[key], err_msg=key)
        found += 1
  assert found == len(source)
  if packing != "none":  # Several trajectories share rows.
    assert max(len(set(b.tolist()) - {0}) for batch in pipeline.eval_batches(run_config(config), source)
               for b in batch["segment_ids"]) > 1


def test_max_prompt_len_keeps_the_prompts_last_tokens():
  t = Trajectory(np.arange(2, 12, dtype=np.int32), np.array([20, 21, 1], np.int32))
  with pytest.raises(ValueError, match="max_prompt_len"):
    rows.trajectory_to_row(t, max_len=8)
  row = rows.trajectory_to_row(t, max_len=8, max_prompt_len=4)
  np.testing.assert_array_equal(row["tokens"], [8, 9, 10, 11, 20, 21, 1])
  np.testing.assert_array_equal(row["remaining"][3:], [3, 2, 1, 0])
  np.testing.assert_array_equal(row["positions"], np.arange(7))
