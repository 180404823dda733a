"""KV-cache decoding and sampling: exact agreement with the cache-free forward, filters on hand-computed cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.decoding import sampler as sampler_lib
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.sampler import SamplingConfig
from tests.helpers import tiny_model

PROMPTS = [[5, 6, 7], list(range(9, 17)), [3], [40, 41, 42, 43, 44]]  # Lengths 3, 8, 1, 5: one batch, mixed.


@pytest.fixture(scope="module")
def model():
  """Tiny Qwen2-layout model; weights scaled up so greedy choices are not near-ties (a fair token-for-token test)."""
  return tiny_model(64, scale=4.0, qkv_bias=True)


REFERENCE_WIDTH = 32


@functools.partial(jax.jit, static_argnums=0)
def _padded_forward(graphdef, params, tokens, segment_ids):
  m = nnx.merge(graphdef, params)
  hidden = m.hidden_states(tokens, jnp.arange(tokens.shape[1])[None], segment_ids)
  return hidden, m.lm_logits(hidden), m.value_logits(hidden)


def full_forward(graphdef, params, seq):
  """(hidden [L, H], LM logits [L, V], value logits [L]) of one sequence without any cache: the training path
  (right-padded to one width, so it compiles once)."""
  tokens = np.zeros((1, REFERENCE_WIDTH), np.int32)
  tokens[0, :len(seq)] = seq
  out = _padded_forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(tokens * 0 + (np.arange(
      REFERENCE_WIDTH) < len(seq))))
  return tuple(np.asarray(x[0, :len(seq)]) for x in out)


def greedy_without_cache(graphdef, params, prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(np.argmax(full_forward(graphdef, params, seq)[1][-1])))
  return seq[len(prompt):]


def prefill(m, prompts, width, extra_slots):
  """The sampler's prefill of left-padded prompts: hidden states, a cache holding them, and the prompts' lengths."""
  tokens, lengths = sampler_lib.left_pad(prompts, width)
  hidden, cache = sampler_lib.prefill(m, jnp.asarray(tokens), lengths, width + extra_slots)
  return hidden, cache, lengths


@pytest.mark.slow
def test_prefill_and_decode_steps_match_the_full_forward(model):
  """Left-padded prompts of different lengths, then decode steps: every hidden state equals the no-cache forward
  (float32; relative and absolute tolerance 1e-4 on hidden values of magnitude up to ~8)."""
  graphdef, params = model
  continuations = [[8, 2, 50], [1, 1, 63], [30, 31, 32], [0, 9, 4]]

  @jax.jit
  def decode_all(params):
    m = nnx.merge(graphdef, params)
    hidden, cache, lengths = prefill(m, PROMPTS, 16, 3)
    decoded = [hidden[:, -1]]
    for step in range(3):
      new = jnp.asarray([[c[step]] for c in continuations])
      fed = jnp.ones((len(PROMPTS), 1), bool)
      hidden, kv = m.cached_hidden_states(new, jnp.asarray(lengths + step)[:, None], cache.mask(fed), cache)
      cache = cache.append(kv, fed)
      decoded.append(hidden[:, 0])
    return jnp.stack(decoded, axis=1)

  decoded = np.asarray(decode_all(params))
  for row, (prompt, extra) in enumerate(zip(PROMPTS, continuations)):
    reference = full_forward(graphdef, params, prompt + extra)[0]
    np.testing.assert_allclose(decoded[row], reference[len(prompt) - 1:], rtol=1e-4, atol=1e-4)


def test_alternative_next_tokens_are_scored_against_the_prefix_without_committing(model):
  """k candidates per row at one position (what length-guided decoding needs): each as if appended alone."""
  graphdef, params = model
  prompts = [[5, 6, 7], [3]]
  candidates = jnp.asarray([[11, 12, 13], [20, 1, 22]])

  @jax.jit
  def score(params):
    m = nnx.merge(graphdef, params)
    _, cache, lengths = prefill(m, prompts, 8, 1)
    hidden, _ = m.cached_hidden_states(candidates, jnp.repeat(jnp.asarray(lengths)[:, None], 3, axis=1),
                                       cache.mask(jnp.ones((2, 3), bool), alternatives=True), cache)
    return m.value_logits(hidden), cache.index

  values, index = score(params)
  for row, prompt in enumerate(prompts):
    for j, candidate in enumerate(candidates[row].tolist()):
      reference = full_forward(graphdef, params, prompt + [candidate])[2][-1]
      np.testing.assert_allclose(values[row, j], reference, rtol=1e-5, atol=1e-5)
  assert int(index) == 8  # Nothing was committed.


GREEDY = SamplingConfig(max_new_tokens=10, eos_ids=(63,), temperature=0.0)


@pytest.fixture(scope="module")
def greedy_samples(model):
  graphdef, params = model
  return Sampler(graphdef, params, GREEDY, sharding.make_mesh(1, 1, 1), batch_size=4).generate(PROMPTS)


def test_greedy_decoding_equals_recomputing_the_full_forward(model, greedy_samples):
  graphdef, params = model
  for prompt, sample in zip(PROMPTS, greedy_samples):
    expected = greedy_without_cache(graphdef, params, prompt, len(sample.completion_ids))
    assert sample.completion_ids.tolist() == expected
    assert sample.finished == (expected[-1] == 63)
    assert sample.finished or len(expected) == 10


def test_rows_stop_at_eos_with_their_own_finished_flags(model, greedy_samples):
  graphdef, params = model
  unstopped = [s.completion_ids.tolist() for s in greedy_samples]
  eos = unstopped[0][2]  # Row 0 emits this token third (maybe earlier too): make it an EOS id.
  stopping = Sampler(graphdef, params, SamplingConfig(max_new_tokens=10, eos_ids=(eos, 63), temperature=0.0),
                     sharding.make_mesh(1, 1, 1), 4)
  samples = stopping.generate(PROMPTS)
  for before, sample in zip(unstopped, samples):
    ends = [i for i, t in enumerate(before) if t in (eos, 63)]
    expected = before[:ends[0] + 1] if ends else before
    assert sample.completion_ids.tolist() == expected
    assert sample.finished == bool(ends)
  assert samples[0].finished and len(samples[0].completion_ids) <= 3


@pytest.mark.slow
def test_a_sample_does_not_depend_on_its_batch_or_the_mesh(model):
  """Per-row random streams and padding masks: a row sampled in a mixed batch on a (2, 2, 2) mesh equals the same
  row sampled alone on one device."""
  graphdef, params = model
  sampling = SamplingConfig(max_new_tokens=6, eos_ids=(63,), temperature=1.3, top_k=20, top_p=0.9, seed=7)
  mesh = sharding.make_mesh(2, 2, 2)
  with jax.set_mesh(mesh):
    shardings = sharding.param_shardings(nnx.split(nnx.eval_shape(lambda: nnx.merge(graphdef, params)))[1], mesh)
  sharded = jax.device_put(params, shardings)
  together = Sampler(graphdef, sharded, sampling, mesh, batch_size=4).generate(PROMPTS, row_ids=[10, 11, 12, 13])
  alone = Sampler(graphdef, params, sampling, sharding.make_mesh(1, 1, 1), batch_size=1)
  for i, prompt in enumerate(PROMPTS):
    assert alone.generate([prompt], row_ids=[10 + i])[0].completion_ids.tolist() == \
        together[i].completion_ids.tolist()
  assert len({tuple(s.completion_ids.tolist()) for s in together}) > 1


LOGPROBS = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05]], np.float32))


def kept(logits):
  return np.isfinite(np.asarray(logits))[0].tolist()


def test_top_k_keeps_the_k_largest_and_ties():
  logits = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 0.0]])
  assert kept(sampler_lib.top_k_filter(logits, 2)) == [False, True, False, True, False]
  assert kept(sampler_lib.top_k_filter(logits, 3)) == [False, True, True, True, False]
  assert kept(sampler_lib.top_k_filter(logits, 0)) == [True] * 5
  np.testing.assert_array_equal(sampler_lib.top_k_filter(logits, 2)[0, 1], 3.0)  # Kept logits are unchanged.


@pytest.mark.parametrize("p, expected", [(0.5, [True, False, False, False]), (0.51, [True, True, False, False]),
                                         (0.79, [True, True, False, False]), (0.81, [True, True, True, False]),
                                         (1.0, [True] * 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
  # Probabilities 0.5, 0.3, 0.15, 0.05: the mass before each token is 0, 0.5, 0.8, 0.95.
  assert kept(sampler_lib.top_p_filter(jnp.asarray(LOGPROBS), p)) == expected


@pytest.mark.parametrize("min_p, expected", [(0.09, [True] * 4), (0.2, [True, True, True, False]),
                                             (0.7, [True, False, False, False])])
def test_min_p_keeps_tokens_above_a_share_of_the_best(min_p, expected):
  # Thresholds min_p * 0.5: 0.045 keeps all, 0.1 drops 0.05, 0.35 keeps only 0.5.
  assert kept(sampler_lib.min_p_filter(jnp.asarray(LOGPROBS), min_p)) == expected


def test_temperature_applies_before_top_p():
  """At temperature 2 the probabilities are ~sqrt(p) normalised: 0.379, 0.294, 0.208, 0.120, so top-p 0.7 keeps
  three tokens (mass before the third: 0.673); at temperature 1 it keeps two (mass before the third: 0.8)."""
  logits = jnp.asarray(LOGPROBS)
  np.testing.assert_allclose(sampler_lib.scale_by_temperature(logits, 2.0), LOGPROBS / 2.0)
  hot = SamplingConfig(max_new_tokens=1, eos_ids=(0,), temperature=2.0, top_p=0.7)
  cold = SamplingConfig(max_new_tokens=1, eos_ids=(0,), temperature=1.0, top_p=0.7)
  assert kept(sampler_lib.filter_logits(logits, hot)) == [True, True, True, False]
  assert kept(sampler_lib.filter_logits(logits, cold)) == [True, True, False, False]


def test_sampled_tokens_follow_the_filtered_distribution():
  """top-k 2 of (0.5, 0.3, 0.15, 0.05): only tokens 0 and 1, at 0.625 / 0.375."""
  sampling = SamplingConfig(max_new_tokens=1, eos_ids=(0,), top_k=2)
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  tokens = np.asarray(sampler_lib.next_tokens(jnp.repeat(jnp.asarray(LOGPROBS), n, axis=0), keys, sampling))
  counts = np.bincount(tokens, minlength=4) / n
  assert counts[2] == counts[3] == 0
  assert counts[0] == pytest.approx(0.625, abs=0.015)


def test_bad_sampling_settings_name_the_field():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(max_new_tokens=4, eos_ids=(1,), top_p=0.0)
  with pytest.raises(ValueError, match="eos_ids"):
    SamplingConfig(max_new_tokens=4, eos_ids=())
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0, eos_ids=(1,))


# --- The reference server's filter semantics (SamplingConfig.filter_style="reference") ---------------------------

def _style(style, **settings):
  return SamplingConfig(max_new_tokens=1, eos_ids=(0,), filter_style=style, **settings)


def test_reference_top_p_uses_the_raw_top_k_mass_at_lifebench_settings():
  """top_k 15, top_p 0.999: 14 tokens share 0.8995, the 15th has 0.0005, 250 more share 0.1. Renormalised within the
  top 15 the mass before the 15th is 0.99944 >= 0.999, so "hf" drops it; raw it is 0.8995 <= 0.999, so the reference
  keeps all 15."""
  probs = np.concatenate([np.full(14, 0.8995 / 14), [0.0005], np.full(250, 0.1 / 250)])
  logits = jnp.asarray(np.log(probs)[None], jnp.float32)
  hf = np.isfinite(np.asarray(sampler_lib.filter_logits(logits, _style("hf", top_k=15, top_p=0.999))))[0]
  reference = np.isfinite(np.asarray(sampler_lib.filter_logits(logits, _style("reference", top_k=15, top_p=0.999))))[0]
  assert hf.sum() == 14 and not hf[14]
  assert reference.sum() == 15 and reference[:15].all()


def test_reference_top_k_keeps_exactly_k_and_top_p_keeps_ties_of_the_bound():
  logits = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 0.0]])
  assert kept(sampler_lib.filter_logits(logits, _style("reference", top_k=2))) == [False, True, False, True, False]
  # Three-way tie for the 2nd place: "hf" keeps all tied tokens, the reference exactly 2 (lower index first).
  tied = jnp.asarray([[5.0, 1.0, 1.0, 1.0]])
  assert kept(sampler_lib.filter_logits(tied, _style("hf", top_k=2))) == [True] * 4
  assert kept(sampler_lib.filter_logits(tied, _style("reference", top_k=2))) == [True, True, False, False]
  # (0.5, 0.3, 0.15, 0.05) with top_p 0.8: the mass before the third token is 0.8 (within float32 rounding). The
  # reference keeps it when that mass is <= p; the strict rule does not. Nudged by 1e-6 either way they agree.
  for style in ("hf", "reference"):
    assert kept(sampler_lib.filter_logits(jnp.asarray(LOGPROBS), _style(style, top_p=0.8 - 1e-6)))[:3] == [True,
                                                                                                          True, False]
    assert kept(sampler_lib.filter_logits(jnp.asarray(LOGPROBS), _style(style, top_p=0.8 + 1e-6))) == [True, True,
                                                                                                       True, False]


def test_styles_agree_without_top_k_away_from_the_top_p_bound():
  rng = np.random.default_rng(0)
  for _ in range(50):
    logits = jnp.asarray(rng.normal(size=(1, 40)) * 2, jnp.float32)
    probs = np.sort(np.asarray(jax.nn.softmax(logits)))[0, ::-1]
    p = float(rng.uniform(0.3, 0.99))
    if np.min(np.abs(np.cumsum(probs) - probs - p)) < 1e-5:
      continue
    min_p = float(rng.choice([0.0, 0.05]))
    assert kept(sampler_lib.filter_logits(logits, _style("hf", top_p=p, min_p=min_p))) == kept(
        sampler_lib.filter_logits(logits, _style("reference", top_p=p, min_p=min_p)))


def test_filter_style_is_checked_and_left_out_of_the_recorded_settings_by_default():
  with pytest.raises(ValueError, match="filter_style"):
    _style("vllm")
  assert "filter_style" not in _style("hf").to_dict()
  assert _style("reference").to_dict()["filter_style"] == "reference"


def test_categorical_rows_draws_the_softmax_distribution_and_never_a_filtered_token():
  """The two-level inverse-CDF draw: a chi-square test against softmax over 3 vocabulary blocks (the last one
  partial), no -inf token ever drawn, and a row with one kept token always draws it (whichever block holds it)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  vocab = 2 * sampler_lib.SAMPLE_BLOCK + 100
  logits = jnp.asarray(np.random.default_rng(0).normal(size=vocab) * 2, jnp.float32)
  logits = logits.at[::3].set(-jnp.inf)
  draws = 60_000
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(draws))
  tokens = np.asarray(jax.jit(lambda k: sampler_lib.categorical_rows(k, jnp.broadcast_to(logits, (draws, vocab))))(keys))
  counts = np.bincount(tokens, minlength=vocab)
  assert counts[::3].sum() == 0
  expected = draws * np.asarray(jax.nn.softmax(logits), np.float64)
  enough = expected >= 5  # Pool the rare tokens into one cell (a chi-square cell needs >= 5 expected).
  observed = np.append(counts[enough], counts[~enough & (expected > 0)].sum())
  pooled = np.append(expected[enough], expected[~enough & (expected > 0)].sum())
  assert stats.chisquare(observed, pooled * observed.sum() / pooled.sum()).pvalue > 1e-3
  for kept in (0, sampler_lib.SAMPLE_BLOCK - 1, sampler_lib.SAMPLE_BLOCK, vocab - 1):
    one = jnp.full((4, vocab), -jnp.inf).at[:, kept].set(0.0)
    np.testing.assert_array_equal(sampler_lib.categorical_rows(keys[:4], one), [kept] * 4)
