"""Guided-decoding models that score candidates with the candidate-value head (model/candidate_head.py).

Two scorers of V(s_t + x) for the k candidates x of a decode step (`SCORERS`):
  next_state      the candidates run through the LenVM as k alternative next tokens over its KV cache, and the value
                  head reads each one's hidden state (decoding/guided_models.py; the reference: it sees how x
                  attends to the prefix);
  candidate_head  Q(s_t, x) from the hidden state of s_t, which the step already computed: k dot products, no
                  k-token forward. Only the chosen token then runs through the trunk, as in plain decoding.

So a guided step with the candidate head costs a plain decode step plus the two small heads on one hidden state per
row, whatever k is. State per row: the KV cache and the hidden state of the last token.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from lenvm_jax.decoding.guided_models import Pair, SharedTrunk, TransformerGenerator, TransformerScorer, ValueScorer
from lenvm_jax.decoding.sampler import advance, prefill
from lenvm_jax.model_config import ModelConfig
from lenvm_jax.value.targets import TargetKind

SCORERS = ("next_state", "candidate_head")


def candidate_values(model, kind: TargetKind, hidden, candidates):
  """Logits z [B, k] of V(s_t + x) = -sigmoid(z) for candidates [B, k] from the hidden states [B, H] of s_t (the
  discounted convention guided decoding reads exact lengths from)."""
  return kind.discounted_logit(model.candidate_logits(hidden, candidates))


def _prefill_last(model, prompt_tokens, prompt_lengths, cache_len):
  """(cache, hidden [B, H] of every prompt's last token) after the prefill (left padding: the last column)."""
  hidden, cache = prefill(model, prompt_tokens, prompt_lengths, cache_len)
  return cache, hidden[:, -1]


@dataclasses.dataclass(frozen=True)
class CandidateHeadScorer(ValueScorer):
  """A LengthValueModel with a candidate head used as the LenVM of a Pair (a separate generator). Pending between
  score and commit: the candidates and their position, so commit can run the chosen one."""

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    return _prefill_last(nnx.merge(self.graphdef, params), prompt_tokens, prompt_lengths, cache_len)

  def score(self, params, state, candidates, positions):
    _, hidden = state
    return candidate_values(nnx.merge(self.graphdef, params), self.kind, hidden, candidates), (candidates, positions)

  def commit(self, params, state, pending, choice):
    candidates, positions = pending
    chosen = jnp.take_along_axis(candidates, choice[:, None], axis=1)[:, 0]
    return advance(nnx.merge(self.graphdef, params), state[0], chosen, positions)


@dataclasses.dataclass(frozen=True)
class CandidateHeadSharedTrunk(ValueScorer):
  """One LengthValueModel that generates (LM head) and scores (candidate head) on one trunk and one KV cache."""
  vocab_size: int

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    model = nnx.merge(self.graphdef, params)
    cache, hidden = _prefill_last(model, prompt_tokens, prompt_lengths, cache_len)
    return (cache, hidden), model.lm_logits(hidden)

  def score(self, params, state, candidates, positions):
    del positions
    return candidate_values(nnx.merge(self.graphdef, params), self.kind, state[1], candidates), None

  def commit(self, params, state, pending, choice, tokens, positions):
    del pending, choice
    model = nnx.merge(self.graphdef, params)
    cache, hidden = advance(model, state[0], tokens, positions)
    return (cache, hidden), model.lm_logits(hidden)


def check_scorer(scorer: str, model_config: ModelConfig):
  if scorer not in SCORERS:
    raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
  if scorer == "candidate_head" and model_config.candidate_head == "none":
    raise ValueError("scorer 'candidate_head' needs a LenVM with a candidate head (a run trained with "
                     "model.candidate_head='table' or 'tied' and loss.candidate_weight > 0); use 'next_state'")


def lenvm_scorer(scorer: str, graphdef, kind: TargetKind, model_config: ModelConfig):
  """The LenVM side of a Pair: TransformerScorer (next_state) or CandidateHeadScorer (candidate_head)."""
  check_scorer(scorer, model_config)
  return (CandidateHeadScorer if scorer == "candidate_head" else TransformerScorer)(graphdef, kind)


def shared_trunk(scorer: str, graphdef, kind: TargetKind, model_config: ModelConfig):
  """One model that generates and scores: SharedTrunk (next_state) or CandidateHeadSharedTrunk (candidate_head)."""
  check_scorer(scorer, model_config)
  cls = CandidateHeadSharedTrunk if scorer == "candidate_head" else SharedTrunk
  return cls(graphdef, kind, model_config.vocab_size)


def pair(scorer: str, generator_graphdef, lenvm_graphdef, kind: TargetKind, lenvm_config: ModelConfig) -> Pair:
  """A transformer generator and a separate LenVM (same token ids) scoring with `scorer`."""
  return Pair(TransformerGenerator(generator_graphdef, lenvm_config.vocab_size),
              lenvm_scorer(scorer, lenvm_graphdef, kind, lenvm_config))
