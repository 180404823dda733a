"""The prompt id format and a record's prompt group: one definition for importers, splits and metrics."""

import numpy as np
import pytest

from lenvm_jax.data import prompt_groups
from lenvm_jax.data.records import Trajectory


def _t(length, generator="a", prompt=(5,), prompt_id=None, finished=True):
  return Trajectory(np.asarray(prompt, np.int32), np.ones(length, np.int32), finished, prompt_id, generator)


def test_prompt_id_round_trip():
  prompt_id = prompt_groups.make_prompt_id("P_12", "5-Shot/Hint")
  assert prompt_id == "P_12|5-Shot/Hint"
  assert prompt_groups.problem_of(prompt_id) == "P_12" and prompt_groups.problem_of(prompt_id, "") == prompt_id
  assert prompt_groups.cell_of((prompt_id, "g")) == ("g", "5-Shot/Hint")
  assert prompt_groups.cell_of(((3, 4), "g")) == ("g", "")  # Known by tokens only: no cell.


def test_records_without_prompt_id_are_refused():
  with pytest.raises(ValueError, match="prompt_id"):
    prompt_groups.problem_of(None, "|")


def test_group_by_prompt_keeps_finished_by_prompt_and_generator():
  unfinished = Trajectory(np.asarray([5], np.int32), np.ones(7, np.int32), False, "p", "a")
  groups = prompt_groups.group_by_prompt([_t(4, "a", prompt_id="p"), _t(6, "a", prompt_id="p"),
                                          _t(5, "b", prompt_id="p"), unfinished, _t(2, "a", prompt=(7, 8))])
  assert groups == {("p", "a"): [4, 6], ("p", "b"): [5], ((7, 8), "a"): [2]}
  assert prompt_groups.group_key(_t(1, None, prompt_id="q")) == ("q", prompt_groups.UNKNOWN_GENERATOR)


def test_boundary_groups_finished_or_as_the_reference_counts_every_sample():
  cut = lambda n, prompt_id: _t(n, "a", prompt_id=prompt_id, finished=False)
  samples = [_t(4, prompt_id="p"), cut(9, "p"), _t(6, prompt_id="p"),  # p: 3 samples, one cut at 9 tokens.
             _t(2, prompt_id="q"), _t(3, prompt_id="q"), _t(5, prompt_id="q"),  # q: 3 finished.
             _t(7, prompt_id="r"), cut(8, "r")]  # r: 2 samples.
  assert prompt_groups.boundary_groups(samples) == prompt_groups.group_by_prompt(samples) == {
      ("p", "a"): [4, 6], ("q", "a"): [2, 3, 5], ("r", "a"): [7]}
  # The reference: unfinished samples count with their token count; groups without exactly N samples are skipped
  # (N: the most common group size, 3, unless given).
  assert prompt_groups.boundary_groups(samples, "reference") == {("p", "a"): [4, 9, 6], ("q", "a"): [2, 3, 5]}
  assert prompt_groups.boundary_groups(samples, "reference", samples_per_prompt=2) == {("r", "a"): [7, 8]}
  assert prompt_groups.boundary_groups([], "reference") == {}
  with pytest.raises(ValueError, match="grouping"):
    prompt_groups.boundary_groups(samples, "all")


def test_unseeded_split_draws_each_group_by_its_hash_and_seeded_split_takes_an_exact_share():
  ids = [f"p{i}" for i in range(200)]
  assert prompt_groups.split_groups(ids, 0.3) == {i: prompt_groups.hash_split(i, 0.3) for i in ids}
  seeded = prompt_groups.split_groups(ids, 0.3, seed=4)
  assert list(seeded.values()).count("eval") == 60
  assert prompt_groups.split_key(None, [3, 4]) == prompt_groups.split_key(None, [3, 4]) != prompt_groups.split_key(
      None, [3, 5])
  assert prompt_groups.split_key(7, [3, 4]) == "7"
  with pytest.raises(ValueError, match="eval_fraction"):
    prompt_groups.split_groups(ids, 1.0)
