"""Each guided-decoding rule pinned on hand-built candidate sets: the paper's rules (argmax / argmin V, Equal To in
value space), the reference code's (At Least switches to the shortest once the budget is met, Equal To in length
space with R = max(T - generated, 0)) and this framework's earlier sampling rules, with EOS and budget edges.

`_definition` restates each deterministic rule in plain Python from its written definition (docs/inference.md), and
random candidate sets check `guided.choose` against it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenvm_jax.decoding import guided
from lenvm_jax.decoding.guided import CONVENTIONS, LengthRequest

GAMMA = 0.997


def value_of(length):
  """V of a state with `length` tokens still to come (EOS: 0)."""
  return -(1.0 - GAMMA**length)


@functools.partial(jax.jit, static_argnames="gamma")
def _choose(logits, values, rules, targets, generated, selections, spaces, offsets, seed, gamma=GAMMA):
  keys = jax.random.split(jax.random.key(seed), logits.shape[0])
  return guided.choose(logits, values, rules, targets, jnp.zeros(logits.shape[0]), generated, keys, gamma,
                       selections, spaces, offsets)


def choose_one(rule, target, generated, lengths, probs=None, convention="paper", seed=0, **fields):
  """The chosen index among candidates whose expected remaining lengths are `lengths` (0 = EOS, V = 0; None = a
  filtered-out candidate), sorted by probability as the decoder sorts them."""
  settings = {**CONVENTIONS[convention], **fields}
  k = len(lengths)
  probs = np.linspace(1.0, 0.5, k) if probs is None else np.asarray(probs, np.float64)
  logits = np.where([n is None for n in lengths], -np.inf, np.log(probs / probs.sum()))
  values = np.asarray([value_of(n or 0) for n in lengths], np.float32)
  row = lambda x, dtype=np.int32: jnp.asarray([x], dtype)
  return int(_choose(jnp.asarray(logits[None], jnp.float32), jnp.asarray(values[None]), row(guided.RULES.index(rule)),
                     row(target), row(generated), row(guided.SELECTIONS.index(settings["selection"])),
                     row(guided.SPACES.index(settings["space"])), row(settings["target_offset"]), seed)[0])


# --- Equal To ---------------------------------------------------------------------------------------------------

def test_equal_to_value_space_and_length_space_disagree_at_long_horizons():
  # R = 500 at gamma 0.997: v* = -0.777; a 400-token candidate (V -0.699) is 0.078 away in value, a 620-token one
  # (V -0.845) 0.067: value space takes 620; in length space 400 is 100 tokens away, 620 is 120: 400.
  for convention, offset in (("paper", 1), ("reference", 0)):
    target = 500 + offset  # R = 500 under either offset.
    assert choose_one("equal_to", target, 0, [400, 620], convention=convention, space="value") == 1
    assert choose_one("equal_to", target, 0, [400, 620], convention=convention, space="length") == 0
  # The defaults: the paper's value space, the reference's length space.
  assert choose_one("equal_to", 501, 0, [400, 620]) == 1
  assert choose_one("equal_to", 500, 0, [400, 620], convention="reference") == 0


def test_equal_to_target_offset_decides_when_eos_is_taken():
  # Target 10 tokens (EOS included), 9 generated. Offset 1: the candidate is the 10th token, R = 0, EOS fits exactly.
  # Offset 0 (the reference's R = max(T - generated, 0) = 1): a candidate leaving 1 more token wins over EOS.
  candidates = [1, 0, 30]
  for space in guided.SPACES:
    assert choose_one("equal_to", 10, 9, candidates, space=space) == 1
    assert choose_one("equal_to", 10, 9, candidates, convention="reference", space=space) == 0
    # Past the target R stays 0 (max(., 0)): EOS under both offsets.
    assert choose_one("equal_to", 10, 15, candidates, convention="reference", space=space) == 1


def test_equal_to_ties_go_to_the_more_likely_candidate_and_filtered_ones_never_win():
  assert choose_one("equal_to", 21, 0, [20, 20, 5]) == 0
  assert choose_one("equal_to", 21, 0, [20, 20, 5], probs=[0.5, 0.5, 0.9]) == 0  # Same distance: lower index.
  assert choose_one("equal_to", 21, 0, [None, 20, 5]) == 1
  assert choose_one("equal_to", 21, 0, [None, None, 5], convention="reference") == 2


# --- At Most / At Least -----------------------------------------------------------------------------------------

def test_at_most_paper_and_reference_take_the_shortest_even_when_others_fit():
  # 100 tokens wanted; all candidates fit, yet the paper (argmax V) and the reference (`le`) take EOS.
  for convention in ("paper", "reference"):
    assert choose_one("at_most", 100, 0, [10, 0, 40], convention=convention) == 1
    assert choose_one("at_most", 100, 0, [10, None, 40], convention=convention) == 0  # EOS filtered out.
    assert choose_one("at_most", 5, 50, [10, 3, 40], convention=convention) == 1  # Over budget: still shortest.


def test_at_most_sample_fitting_samples_among_the_candidates_that_fit():
  # R = 19: the 10- and 3-token candidates fit (V >= v*), the 40-token one does not.
  picks = {choose_one("at_most", 20, 0, [40, 10, 3], convention="sample_fitting", seed=s) for s in range(40)}
  assert picks == {1, 2}
  # Nothing fits: the shortest.
  assert choose_one("at_most", 2, 0, [40, 10, 3], convention="sample_fitting") == 2


def test_at_least_paper_always_takes_the_longest_even_past_the_budget():
  assert choose_one("at_least", 50, 0, [10, 0, 40]) == 2
  assert choose_one("at_least", 50, 80, [10, 0, 40]) == 2  # Budget met long ago: still the longest, never EOS.
  assert choose_one("at_least", 50, 80, [None, 0, None]) == 1  # EOS alone left: EOS.


def test_at_least_reference_switches_to_the_shortest_once_the_budget_is_met():
  # The reference: R = max(T - generated, 0); longest while R > 0, the shortest (EOS) at R = 0.
  assert choose_one("at_least", 10, 0, [10, 0, 40], convention="reference") == 2
  assert choose_one("at_least", 10, 9, [10, 0, 40], convention="reference") == 2  # R = 1: not yet.
  assert choose_one("at_least", 10, 10, [10, 0, 40], convention="reference") == 1  # R = 0: EOS.
  assert choose_one("at_least", 10, 10, [10, None, 40], convention="reference") == 0  # No EOS offered: shortest.
  # With offset 1 (the target counts EOS) the switch comes one token earlier.
  assert choose_one("at_least", 10, 9, [10, 0, 40], convention="reference", target_offset=1) == 1


def test_at_least_sample_fitting_samples_among_candidates_reaching_the_target():
  # R = 29 with offset 1: the 40- and 30-token candidates reach it (V <= v*); 10 and EOS do not.
  picks = {choose_one("at_least", 30, 0, [40, 10, 0, 30], convention="sample_fitting", seed=s) for s in range(40)}
  assert picks == {0, 3}
  assert choose_one("at_least", 100, 0, [40, 10, 0, 30], convention="sample_fitting") == 0  # None reaches: longest.
  assert choose_one("at_least", 30, 29, [40, 10, 0, 30], convention="sample_fitting") == 2  # EOS meets it: EOS.


# --- Every deterministic rule against its written definition ----------------------------------------------------

def _definition(rule, target, generated, lengths, probs, selection, space, offset):
  """The chosen index, from the rules as docs/inference.md writes them (plain Python, float64)."""
  remaining = max(target - generated - offset, 0)
  allowed = [i for i, n in enumerate(lengths) if n is not None]
  values = {i: value_of(lengths[i]) for i in allowed}
  best = lambda cost: min(allowed, key=lambda i: (cost(i), -probs[i], i))
  shortest, longest = best(lambda i: -values[i]), best(lambda i: values[i])
  if rule == "equal_to":
    if space == "value":
      return best(lambda i: abs(values[i] - value_of(remaining)))
    return best(lambda i: abs(np.log1p(max(values[i], -1 + 1e-7)) / np.log(GAMMA) - remaining))
  if rule == "at_most":
    return shortest
  if selection == "paper":
    return longest
  return shortest if remaining == 0 else longest


@pytest.mark.parametrize("convention", ["paper", "reference"])
def test_deterministic_rules_match_their_definitions_on_random_candidates(convention):
  rng = np.random.default_rng(0)
  cases = []
  for _ in range(300):
    k = int(rng.integers(1, 8))
    lengths = [int(n) for n in rng.choice([0, 1, 2, 3, 5, 8, 20, 60, 150, 400, 620, 900], size=k, replace=False)]
    lengths = [None if rng.random() < 0.2 else n for n in lengths]
    if all(n is None for n in lengths):
      lengths[0] = int(rng.integers(0, 50))
    probs = np.sort(rng.random(k))[::-1] + 1e-3
    rule = str(rng.choice(["equal_to", "at_most", "at_least"]))
    target, generated = int(rng.integers(1, 700)), int(rng.integers(0, 700))
    cases.append((rule, target, generated, lengths, probs))
  settings = CONVENTIONS[convention]
  for space in guided.SPACES:
    for rule, target, generated, lengths, probs in cases:
      logits = np.where([n is None for n in lengths], -np.inf, np.log(probs))
      values = [value_of(n or 0) for n in lengths]
      row = lambda x: jnp.asarray([x], jnp.int32)
      got = int(_choose(jnp.asarray(logits[None], jnp.float32), jnp.asarray([values], jnp.float32),
                        row(guided.RULES.index(rule)), row(target), row(generated),
                        row(guided.SELECTIONS.index(settings["selection"])), row(guided.SPACES.index(space)),
                        row(settings["target_offset"]), 0)[0])
      want = _definition(rule, target, generated, lengths, probs, settings["selection"], space,
                         settings["target_offset"])
      if got != want:  # float32 vs float64 may only differ on (near) ties of the rule's own cost.
        assert lengths[got] is not None and _near_tie(rule, got, want, target, generated, lengths, space,
                                                      settings["target_offset"]), (rule, target, generated, lengths)


def _near_tie(rule, got, want, target, generated, lengths, space, offset):
  remaining = max(target - generated - offset, 0)
  if rule != "equal_to":
    return lengths[got] == lengths[want]
  if space == "value":
    cost = lambda i: abs(value_of(lengths[i]) - value_of(remaining))
    return abs(cost(got) - cost(want)) < 1e-6
  return abs(abs(lengths[got] - remaining) - abs(lengths[want] - remaining)) < 0.05


def test_requests_name_their_conventions_and_check_the_fields():
  assert LengthRequest("at_least", 5) == LengthRequest.following("paper", "at_least", 5)
  reference = LengthRequest.following("reference", "equal_to", 7)
  assert (reference.selection, reference.space, reference.target_offset) == ("reference", "length", 0)
  with pytest.raises(ValueError, match="selection"):
    LengthRequest("at_most", 5, selection="greedy")
  with pytest.raises(ValueError, match="space"):
    LengthRequest("equal_to", 5, space="log")
  with pytest.raises(ValueError, match="target_offset"):
    LengthRequest("equal_to", 5, target_offset=2)
  with pytest.raises(ValueError, match="convention"):
    LengthRequest.following("ours", "equal_to", 5)
