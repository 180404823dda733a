"""Models for guided decoding (lenvm_jax/decoding/guided.py): a transformer generator, a transformer LenVM scorer,
one shared-trunk model that is both, and `Pair`, which joins any generator with any scorer.

Cost per decode step (why guidance is cheap here): the scorer runs the k candidates of every row as k new tokens
in one forward over its KV cache (each candidate attends to the prefix and itself; KVCache.mask alternatives), and
commits the chosen candidate's keys and values from that same forward, so no token is ever run twice. Decoding is
memory-bound (weights and cache are read once per forward whatever k is), so k tokens cost little more than one.
A shared trunk needs nothing else: the chosen candidate's hidden state also gives the next LM logits. Two models
add the generator's usual one-token step.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lenvm_jax.decoding.sampler import advance, prefill
from lenvm_jax.errors import UserError
from lenvm_jax.model.kv_cache import take_alternative
from lenvm_jax.value.targets import TargetKind


def _start(model, prompt_tokens, prompt_lengths, cache_len):
  """Prefill, then the next-token logits [B, V] at every prompt's last token: (cache, logits)."""
  hidden, cache = prefill(model, prompt_tokens, prompt_lengths, cache_len)
  return cache, model.lm_logits(hidden[:, -1:])[:, 0]


def _score_alternatives(model, kind: TargetKind, cache, candidates, positions):
  """Hidden states [B, k, H], value-head logits z [B, k] (discounted convention: V = -sigmoid(z), kept as a logit so
  lengths stay exact past float32's V) and (keys, values) [layers, B, k, ...] of candidates as alternative next
  tokens."""
  fed = jnp.ones(candidates.shape, bool)
  hidden, new_kv = model.cached_hidden_states(candidates, jnp.broadcast_to(positions[:, None], candidates.shape),
                                              cache.mask(fed, alternatives=True), cache)
  return hidden, kind.discounted_logit(model.value_logits(hidden)), new_kv


def _commit_choice(cache, new_kv, choice):
  """Appends the chosen candidate's keys and values (already computed while scoring) to the cache."""
  return cache.append(take_alternative(new_kv, choice), jnp.ones((choice.shape[0], 1), bool))


@dataclasses.dataclass(frozen=True)
class TransformerGenerator:
  """A LengthValueModel used for its LM head (params: its nnx state)."""
  graphdef: nnx.GraphDef
  vocab_size: int

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    return _start(nnx.merge(self.graphdef, params), prompt_tokens, prompt_lengths, cache_len)

  def advance(self, params, cache, tokens, positions):
    model = nnx.merge(self.graphdef, params)
    cache, hidden = advance(model, cache, tokens, positions)
    return cache, model.lm_logits(hidden)


@dataclasses.dataclass(frozen=True)
class ValueScorer:
  """What every LenVM scorer holds: its model's graphdef and the target kind that turns the value head's z into V
  (its run's loss.target_type, with gamma)."""
  graphdef: nnx.GraphDef
  kind: TargetKind

  @property
  def gamma(self) -> float:
    return self.kind.gamma


@dataclasses.dataclass(frozen=True)
class TransformerScorer(ValueScorer):
  """A LengthValueModel used for its value head."""

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    return prefill(nnx.merge(self.graphdef, params), prompt_tokens, prompt_lengths, cache_len)[1]

  def score(self, params, cache, candidates, positions):
    _, logits, new_kv = _score_alternatives(nnx.merge(self.graphdef, params), self.kind, cache, candidates,
                                            positions)
    return logits, new_kv

  def commit(self, params, cache, new_kv, choice):
    del params
    return _commit_choice(cache, new_kv, choice)


@dataclasses.dataclass(frozen=True)
class SharedTrunk(ValueScorer):
  """One LengthValueModel that generates (LM head) and scores (value head) on one trunk and one KV cache."""
  vocab_size: int

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    return _start(nnx.merge(self.graphdef, params), prompt_tokens, prompt_lengths, cache_len)

  def score(self, params, cache, candidates, positions):
    hidden, logits, new_kv = _score_alternatives(nnx.merge(self.graphdef, params), self.kind, cache, candidates,
                                                 positions)
    return logits, (hidden, new_kv)

  def commit(self, params, cache, pending, choice, tokens, positions):
    del tokens, positions  # The chosen candidate was already run; its hidden state gives the next logits.
    hidden, new_kv = pending
    chosen = jnp.take_along_axis(hidden, choice[:, None, None], axis=1)
    return _commit_choice(cache, new_kv, choice), nnx.merge(self.graphdef, params).lm_logits(chosen)[:, 0]


def check_same_vocabulary(policy_vocab: int, lenvm_vocab: int, policy_source: str, lenvm_source: str,
                          fix: str = "pair a LenVM trained on the policy's own tokenizer") -> None:
  """A generator and a LenVM pair only when they share token ids: the LenVM would otherwise value other tokens than
  the ones the generator emits (or index past its embedding) without a word."""
  if policy_vocab != lenvm_vocab:
    raise UserError.at(f"the policy's vocabulary ({policy_vocab} tokens) differs from the LenVM's ({lenvm_vocab})",
                       f"{policy_source} vs {lenvm_source}", fix)


@dataclasses.dataclass(frozen=True)
class Pair:
  """A generator and a separate scorer with the same token ids; params = (generator params, scorer params)."""
  generator: object  # start(params, tokens, lengths, cache_len) -> (state, logits); advance(...) -> same.
  scorer: object  # start(...) -> state; score(...) -> (logits z, pending); commit(params, state, pending, choice).

  @property
  def vocab_size(self) -> int:
    return self.generator.vocab_size

  @property
  def gamma(self) -> float:
    return self.scorer.gamma

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    generator_state, logits = self.generator.start(params[0], prompt_tokens, prompt_lengths, cache_len)
    return (generator_state, self.scorer.start(params[1], prompt_tokens, prompt_lengths, cache_len)), logits

  def score(self, params, state, candidates, positions):
    return self.scorer.score(params[1], state[1], candidates, positions)

  def commit(self, params, state, pending, choice, tokens, positions):
    generator_state, logits = self.generator.advance(params[0], state[0], tokens, positions)
    return (generator_state, self.scorer.commit(params[1], state[1], pending, choice)), logits
