"""The decode engine: continuous batching gives each request exactly what it gets alone, and what the static
sampler gave (greedy, sampled and guided), token for token."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.decoding import sampler as sampler_lib
from lenvm_jax.decoding.engine import Engine, Request
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.decoding.guided_models import Pair, SharedTrunk, TransformerGenerator, TransformerScorer
from lenvm_jax.value.targets import TargetKind
from tests.helpers import tiny_model

VOCAB = 64
EOS = 2


@pytest.fixture(scope="module")
def model():
  """Tiny Qwen2-layout model, weights scaled so greedy choices are not near-ties; EOS made likely enough that rows
  end at different lengths."""
  return tiny_model(VOCAB, scale=4.0, qkv_bias=True)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
  m = nnx.merge(graphdef, params)
  return m.lm_logits(m.hidden_states(tokens, jnp.arange(tokens.shape[1])[None], jnp.ones_like(tokens)))


def greedy_without_cache(graphdef, params, prompt, steps, eos):
  """Greedy decoding by running the whole sequence each step (no cache, no batch): the reference."""
  seq = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, 32), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(_logits(graphdef, params, jnp.asarray(padded)))[0, len(seq) - 1]
    seq.append(int(np.argmax(logits)))
    if seq[-1] == eos:
      break
  return seq[len(prompt):]


PROMPTS = [[5, 6, 7], list(range(9, 17)), [3], [40, 41, 42, 43, 44], [12, 13], [60, 61, 62, 63, 1, 2, 3]]


def test_greedy_equals_the_cache_free_forward_with_more_requests_than_slots(model):
  graphdef, params = model
  mesh = sharding.make_mesh(1, 1, 1)
  engine = Engine(TransformerGenerator(graphdef, VOCAB), params, mesh, eos_ids=(EOS,), slots=2, max_prompt_len=16,
                  max_new_tokens=12, steps_per_call=3)
  budgets = [12, 5, 9, 12, 1, 7]
  out = engine.generate([Request(tuple(p), n, temperature=0.0) for p, n in zip(PROMPTS, budgets)])
  for prompt, n, completion in zip(PROMPTS, budgets, out):
    expected = greedy_without_cache(graphdef, params, prompt, n, EOS)
    np.testing.assert_array_equal(completion.tokens, expected)
    assert completion.finish_reason == ("stop" if expected[-1] == EOS else "length")
    assert completion.prompt_tokens == len(prompt)
  assert not engine.has_work() and engine.stats["busy_slots"] == 0


def test_a_sample_does_not_depend_on_its_batch_and_matches_the_sampler_streams(model):
  """Mixed settings per request in one batch of 4 slots equal each request alone in a 1-slot engine; the seeds
  and sample ids give the static sampler's streams (row_keys / step_keys)."""
  graphdef, params = model
  generator = TransformerGenerator(graphdef, VOCAB)
  requests = [Request(tuple(p), 10, temperature=t, top_k=k, top_p=tp, min_p=mp, seed=3, sample_id=i)
              for i, (p, t, k, tp, mp) in enumerate(zip(PROMPTS, [1.0, 0.7, 0.0, 1.3, 1.0, 0.9],
                                                        [0, 5, 0, 20, 3, 0], [1.0, 0.9, 1.0, 0.8, 1.0, 0.95],
                                                        [0.0, 0.0, 0.0, 0.05, 0.1, 0.0]))]
  mesh = sharding.make_mesh(-1, 1, 1)
  together = Engine(generator, params, mesh, eos_ids=(EOS,), slots=8, max_prompt_len=16, max_new_tokens=10,
                    steps_per_call=4).generate(requests * 2)
  alone = Engine(generator, params, sharding.make_mesh(1, 1, 1), eos_ids=(EOS,), slots=1, max_prompt_len=8,
                 max_new_tokens=10)
  for request, got, again in zip(requests, together, together[len(requests):]):
    expected = alone.generate([request])[0]
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(again.tokens, expected.tokens)
  # One setting for all rows: the static sampler's draws, row id = sample id.
  sampling = sampler_lib.SamplingConfig(max_new_tokens=10, eos_ids=(EOS,), temperature=0.8, top_k=7, seed=3)
  static = Sampler(graphdef, params, sampling, sharding.make_mesh(1, 1, 1), batch_size=2)
  engine = Engine(generator, params, sharding.make_mesh(1, 1, 1), eos_ids=(EOS,), slots=2, max_prompt_len=16,
                  max_new_tokens=10)
  plain = engine.generate([Request(tuple(p), 10, temperature=0.8, top_k=7, seed=3, sample_id=i)
                           for i, p in enumerate(PROMPTS)])
  for got, sample in zip(plain, static.generate(PROMPTS)):
    np.testing.assert_array_equal(got.tokens, sample.completion_ids)


def test_samples_of_one_prompt_share_its_prefill_and_equal_each_served_alone(model):
  """n samples of a prompt: the later ones copy the prompt cache of a slot that holds it (in the same admission,
  or mid-decode), plain and guided, and each equals the request served alone (4 slots: the tail decodes 2 or 1)."""
  graphdef, params = model
  kind = TargetKind("discounted", 0.97, 1024.0)
  mesh = sharding.make_mesh(1, 1, 1)
  rules = [LengthRequest(), LengthRequest("at_most", 4), LengthRequest("equal_to", 6)]
  plain = [Request(tuple(p), n, temperature=1.0, seed=5, sample_id=j)
           for p, n in zip(PROMPTS[:3], [12, 4, 9]) for j in range(3)]
  guided = [Request(tuple(p), 10, seed=2, sample_id=j, length=rules[j]) for p in PROMPTS[3:5] for j in range(3)]
  # Plain (one cache) and a Pair (two caches, each copied); the shared trunk's one cache is the plain case's layout.
  cases = [(TransformerGenerator(graphdef, VOCAB), params, plain, 0),
           (Pair(TransformerGenerator(graphdef, VOCAB), TransformerScorer(graphdef, kind)), (params, params), guided,
            VOCAB)]
  for models, weights, requests, candidates in cases:
    engine = Engine(models, weights, mesh, eos_ids=(EOS,), slots=4, max_prompt_len=16, max_new_tokens=12,
                    num_candidates=candidates, steps_per_call=2)
    together = engine.generate(requests)
    assert engine.share_prompts and engine.shared_prompts >= 4, engine.stats
    assert engine.prefilled_prompts + engine.shared_prompts == len(requests)
    alone = Engine(models, weights, mesh, eos_ids=(EOS,), slots=1, max_prompt_len=16, max_new_tokens=12,
                   num_candidates=candidates)
    for request, got in zip(requests, together):
      expected = alone.generate([request])[0]
      np.testing.assert_array_equal(got.tokens, expected.tokens)
      if candidates:
        np.testing.assert_allclose(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert alone.shared_prompts == 0


def test_guided_rules_in_a_shared_trunk_and_a_pair_agree_and_hit_their_targets(model):
  graphdef, params = model
  kind = TargetKind("discounted", 0.97, 1024.0)
  mesh = sharding.make_mesh(1, 1, 1)
  rules = [LengthRequest("equal_to", 6), LengthRequest("at_least", 9), LengthRequest("at_most", 4),
           LengthRequest(), LengthRequest("tilt", beta=-2.0), LengthRequest("equal_to", 3)]
  requests = [Request(tuple(p), 12, seed=1, sample_id=i, length=r) for i, (p, r) in enumerate(zip(PROMPTS, rules))]
  engine = lambda models, p: Engine(models, p, mesh, eos_ids=(EOS,), slots=4, max_prompt_len=8, max_new_tokens=12,
                                    num_candidates=VOCAB, steps_per_call=5)
  shared = engine(SharedTrunk(graphdef, kind, VOCAB), params).generate(requests)
  paired = engine(Pair(TransformerGenerator(graphdef, VOCAB), TransformerScorer(graphdef, kind)),
                  (params, params)).generate(requests)
  for a, b in zip(shared, paired):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
  lengths = [len(c.tokens) for c in shared]
  assert lengths[0] == 6 and lengths[5] == 3 and lengths[1] >= 9 and 1 <= lengths[2] <= 4
  for c in shared:  # All candidates: EOS is always offered, so Equal To / At Least end on their rule by EOS.
    assert c.tokens[-1] == EOS or c.finish_reason == "length"
    assert np.isneginf(c.logits[-1]) == (c.finish_reason == "stop")
  # A row without a rule samples its whole distribution: the plain engine's draw under the same seed.
  plain = Engine(TransformerGenerator(graphdef, VOCAB), params, mesh, eos_ids=(EOS,), slots=1, max_prompt_len=8,
                 max_new_tokens=12).generate([requests[3]])[0]
  np.testing.assert_array_equal(shared[3].tokens, plain.tokens)


def test_stop_ids_cancel_and_bad_requests(model):
  graphdef, params = model
  engine = Engine(TransformerGenerator(graphdef, VOCAB), params, sharding.make_mesh(1, 1, 1), eos_ids=(EOS,),
                  slots=1, max_prompt_len=8, max_new_tokens=8, steps_per_call=2)
  free = engine.generate([Request((5, 6, 7), 8, temperature=0.0)])[0].tokens
  stop = int(free[2])
  stopped = engine.generate([Request((5, 6, 7), 8, temperature=0.0, stop_token_ids=(stop,))])[0]
  assert stopped.finish_reason == "stop" and stopped.tokens.tolist() == free[:list(free).index(stop) + 1].tolist()
  first = engine.submit(Request((5, 6, 7), 8, temperature=0.0))
  second = engine.submit(Request((9, 10), 8, temperature=0.0))
  engine.step()
  engine.cancel(first)
  engine.cancel(second)  # Still waiting: ends without a slot.
  ended = {c.request_id: c for c in engine.step()}
  assert ended[first].finish_reason == ended[second].finish_reason == "cancelled"
  assert len(ended[first].tokens) == 2 and not engine.has_work()
  for bad, field in [(Request((), 4), "prompt"), (Request((1,) * 9, 4), "max_prompt_len"),
                     (Request((1, VOCAB), 4), "vocabulary"), (Request((1,), 9), "max_new_tokens"),
                     (Request((1,), 4, top_p=0.0), "top_p"), (Request((1,), 4, length=LengthRequest("at_most", 3)),
                                                             "needs a LenVM")]:
    with pytest.raises(ValueError, match=field):
      engine.submit(bad)
