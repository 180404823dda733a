"""Prompt groups of a split as record indices, deterministic subsets of them, and the grouped training order.

The paper's scaling and batching figures vary the training data by prompt: how many prompts (data.max_prompts),
how many samples of each (data.samples_per_prompt), and whether a batch holds whole prompt groups (data.batching =
"grouped"). All three work on `record_groups(source)`: the record indices of every (prompt, generator) group
(prompt_groups.group_key). A source that knows its groups says so with `group_ids()` (the synthetic source, a
`Subset`); any other is read once, record by record.
"""

import functools

import numpy as np

from lenvm_jax.data import prompt_groups


def record_groups(source) -> list[np.ndarray]:
  """Record indices of each prompt group, groups in order of first appearance, indices ascending."""
  if hasattr(source, "group_ids"):
    ids = np.asarray(source.group_ids())
  else:
    index = {}
    ids = np.asarray([index.setdefault(prompt_groups.group_key(source[i]), len(index)) for i in range(len(source))])
  members: dict = {}
  for index, group in enumerate(ids.tolist()):
    members.setdefault(group, []).append(index)
  return [np.asarray(indices, np.int64) for indices in members.values()]


def select(groups: list[np.ndarray], max_prompts: int = 0, samples_per_prompt: int = 0,
           seed: int = 0) -> list[np.ndarray]:
  """At most max_prompts groups (a seeded choice: the first of a seeded permutation, so the choice for a smaller
  max_prompts lies inside that for a larger one), each cut to its first samples_per_prompt records; 0 = no limit.
  Kept groups stay in their original order."""
  chosen = range(len(groups))
  if 0 < max_prompts < len(groups):
    chosen = sorted(np.random.default_rng(seed).permutation(len(groups))[:max_prompts].tolist())
  cut = samples_per_prompt or None
  return [groups[g][:cut] for g in chosen]


class Subset:
  """The records of `source` at `groups`' indices, group by group, as a random-access source of its own."""

  def __init__(self, source, groups: list[np.ndarray]):
    self.source = source
    self.indices = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    self._group_ids = np.repeat(np.arange(len(groups)), [len(g) for g in groups])

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def group_ids(self) -> np.ndarray:
    return self._group_ids


def training_subset(source, max_prompts: int, samples_per_prompt: int, seed: int):
  """`source` itself when both limits are 0, else the Subset that data.max_prompts / data.samples_per_prompt keep."""
  if not max_prompts and not samples_per_prompt:
    return source
  return Subset(source, select(record_groups(source), max_prompts, samples_per_prompt, seed))


class GroupedOrder:
  """Record index at position j of an endless stream in which every epoch lists the prompt groups in a fresh seeded
  order, each group's records one after another (a picklable callable for grain's map_with_index)."""

  def __init__(self, groups: list[np.ndarray], seed: int):
    self.groups = [np.asarray(g, np.int64) for g in groups]
    self.seed = seed
    self.size = sum(len(g) for g in self.groups)

  @functools.lru_cache(maxsize=2)
  def epoch(self, number: int) -> np.ndarray:
    permutation = np.random.default_rng([self.seed, number]).permutation(len(self.groups))
    return np.concatenate([self.groups[g] for g in permutation])

  def __call__(self, position: int, unused_element=None) -> int:
    number, offset = divmod(int(position), self.size)
    return int(self.epoch(number)[offset])
