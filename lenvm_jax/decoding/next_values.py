"""V(s_t + x) along trajectories for a list of next tokens x, with either scorer (decoding/candidate_scoring.py).

For every state s_t from the prompt's last token through the last completion token (s_0 .. s_L, as Predictor.predict
returns V), the values of the states one token further, s_t + x, for each listed token x:
  candidate_head  Q(s_t, x) read off s_t's hidden state: one forward of the sequence, then a [H] x [H, n] product;
  next_state      x run through the trunk after the prefix s_t (the KV cache of the sequence, restricted to s_t's
                  slots, with the n tokens as alternatives), and the value head on its hidden state: one n-token
                  forward per state, in chunks of `chunk` tokens.
Raw model values: guided decoding sets an EOS candidate to 0 itself, so an EOS column here is what the model says.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenvm_jax.decoding import candidate_scoring
from lenvm_jax.decoding.sampler import bucket_width, left_pad, prefill

MAX_ALL_TOKENS = 4096  # token_ids=None ("all") only for vocabularies up to this size: [L, vocab] values per sequence.


def _candidate_head_values(graphdef, kind, params, tokens, lengths, token_ids):
  """[B, W, n] Q(s_slot, x) at every slot of left-padded sequences."""
  model = nnx.merge(graphdef, params)
  hidden, _ = prefill(model, tokens, lengths, tokens.shape[1])
  ids = jnp.broadcast_to(token_ids, hidden.shape[:2] + token_ids.shape)
  return kind.value_estimate(kind.predict(model.candidate_logits(hidden, ids)))


def _next_state_values(graphdef, kind, params, tokens, lengths, token_ids):
  """[B, W, n] V(s_slot + x): every token of token_ids [n] as an alternative next token after each slot's prefix."""
  model = nnx.merge(graphdef, params)
  batch, width = tokens.shape
  _, cache = prefill(model, tokens, lengths, width)
  padding = width - lengths
  fed = jnp.ones((batch, token_ids.shape[0]), bool)
  candidates = jnp.broadcast_to(token_ids, fed.shape)

  def at_slot(slot):
    prefix = cache.replace(valid=cache.valid & (jnp.arange(width) <= slot)[None])
    positions = jnp.broadcast_to((slot - padding + 1)[:, None], fed.shape)
    hidden, _ = model.cached_hidden_states(candidates, jnp.maximum(positions, 0), prefix.mask(fed, alternatives=True),
                                           prefix)
    return kind.value_estimate(kind.predict(model.value_logits(hidden)))  # [B, n]

  return jnp.moveaxis(jax.lax.map(at_slot, jnp.arange(width)), 0, 1)


_SCORE = {"candidate_head": _candidate_head_values, "next_state": _next_state_values}
_jitted = {name: jax.jit(fn, static_argnums=(0, 1)) for name, fn in _SCORE.items()}


def parse_token_ids(text: str, vocab_size: int) -> list[int] | None:
  """'all' -> None (every token; vocabularies up to MAX_ALL_TOKENS), or comma-separated ids -> [ids]."""
  if text.strip() == "all":
    if vocab_size > MAX_ALL_TOKENS:
      raise ValueError(f"--token_ids=all: the vocabulary has {vocab_size} rows, more than {MAX_ALL_TOKENS}; "
                       "list the token ids instead (--token_ids=ID,ID,...)")
    return None
  try:
    ids = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"--token_ids must be 'all' or comma-separated token ids, got {text!r}") from None
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if not ids or bad:
    raise ValueError(f"--token_ids: ids must lie in [0, {vocab_size}), got {bad or text!r}")
  return ids


def next_values(predictor, trajectories, token_ids=None, scorer: str = "candidate_head", batch_size: int = 16,
                chunk: int = 256) -> list[np.ndarray]:
  """For each trajectory, [L + 1, n] float32: V(s_t + x) for t = 0 .. L (L = completion tokens) and the n tokens of
  token_ids (None = every token of the vocabulary, at most MAX_ALL_TOKENS). predictor: a decoding.predict.Predictor."""
  config = predictor.config.model
  candidate_scoring.check_scorer(scorer, config)
  if token_ids is None:
    if config.vocab_size > MAX_ALL_TOKENS:
      raise ValueError(f"all tokens: the vocabulary has {config.vocab_size} rows, more than {MAX_ALL_TOKENS}; "
                       "list the token ids instead")
    token_ids = range(config.vocab_size)
  token_ids = np.asarray(list(token_ids), np.int32)
  if not len(token_ids) or token_ids.min() < 0 or token_ids.max() >= config.vocab_size:
    raise ValueError(f"token ids must be one or more ids in [0, {config.vocab_size}), got {token_ids.tolist()}")
  chunk = len(token_ids) if scorer == "candidate_head" else min(chunk, len(token_ids))
  padded = np.concatenate([token_ids, np.full(-len(token_ids) % chunk, token_ids[-1], np.int32)])
  score = _jitted[scorer]
  out = [None] * len(trajectories)
  order = sorted(range(len(trajectories)),
                 key=lambda i: len(trajectories[i].prompt_ids) + len(trajectories[i].completion_ids))
  for start in range(0, len(order), batch_size):
    indices = order[start:start + batch_size]
    sequences = [np.concatenate([trajectories[i].prompt_ids, trajectories[i].completion_ids]) for i in indices]
    sequences += [sequences[-1]] * (batch_size - len(sequences))  # Filler rows keep one compiled batch shape.
    width = bucket_width(max(map(len, sequences)), 16)
    tokens, lengths = left_pad(sequences, width)
    values = np.concatenate([
        np.asarray(jax.device_get(score(predictor.graphdef, predictor.kind, predictor.params, jnp.asarray(tokens),
                                        jnp.asarray(lengths), jnp.asarray(padded[i:i + chunk]))))
        for i in range(0, len(padded), chunk)], axis=-1)[..., :len(token_ids)]
    for row, i in enumerate(indices):
      first = width - lengths[row] + len(trajectories[i].prompt_ids) - 1  # s_0's slot.
      out[i] = values[row, first:width].astype(np.float32)
  return out
