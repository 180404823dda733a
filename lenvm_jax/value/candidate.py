"""The candidate-value loss and metrics: Q(s_t, a) of the realised next token a regresses on the next state's target.

No new data: at every value position t whose next position t + 1 is a value position of the same sequence, the token
a at t + 1 is a next token actually taken from s_t, and the value target of s_{t+1} (G_{t+1}, or the GAE target
there) is its target; an EOS next token (s_{t+1} terminal, n = 0) gets 0. So the loss touches one column of Q per
position (a gather, never a [T, vocab] matmul) and is a token mean over those positions, like the value loss.
Padding (segment 0), segment boundaries of packed rows and a row's last column are never crossed.

As the objective's other pieces, `sums` returns sums; `count` is the global denominator.
"""

import jax.numpy as jnp

from lenvm_jax.data import rows
from lenvm_jax.value import targets


def _shift_left(x, fill=0):
  """x[..., t + 1] at t; the last column gets `fill`."""
  return jnp.concatenate([x[..., 1:], jnp.full_like(x[..., :1], fill)], axis=-1)


def next_state_mask(batch):
  """[..., T] bool: t and t + 1 are value positions of the same (real) sequence."""
  value = batch[rows.VALUE_MASK].astype(bool)
  segments = batch[rows.SEGMENT_IDS]
  return value & _shift_left(value, False) & (segments == _shift_left(segments)) & (segments != 0)


def next_tokens(batch):
  """[..., T] the token at t + 1 (the candidate that was taken from s_t); 0 in the last column."""
  return _shift_left(batch[rows.TOKENS])


def next_state_targets(value_targets, batch):
  """[..., T] the target of s_{t+1} at t, 0 where s_{t+1} is terminal (EOS: no tokens remain)."""
  return jnp.where(_shift_left(batch[rows.REMAINING], -1) == 0, 0.0, _shift_left(value_targets))


def count(batch):
  """Global number of candidate positions (the loss denominator)."""
  return jnp.sum(next_state_mask(batch).astype(jnp.float32))


def sums(kind: targets.TargetKind, candidate_z, value_targets, batch) -> dict:
  """{"candidate_sq_err": sum over candidate positions of the regression loss of Q(s_t, a) against target(s_{t+1})
  (squared error, or Huber under loss.kind = "huber", as the value loss)}; candidate_z [..., T] is the head's logit of
  the realised next token, value_targets the (stop-gradient) value targets of every position."""
  per_token = kind.regression_loss(kind.predict(candidate_z), next_state_targets(value_targets, batch))
  return {"candidate_sq_err": jnp.sum(next_state_mask(batch).astype(jnp.float32) * per_token)}


def metric_sums(kind: targets.TargetKind, candidate_z, z, batch) -> dict:
  """Metric sums (with /count) over candidate positions, in value space against the Monte-Carlo G_{t+1}:
  candidate_value_mse. On synthetic data (exact values known), both scorers against the exact V(s_{t+1}) of the
  realised token: candidate_exact_mse (the head) and next_state_exact_mse (the value head run on s_{t+1}, i.e. the
  next-state scorer), and candidate_bayes_value_mse (the exact value's own MSE against G: the floor)."""
  mask = next_state_mask(batch).astype(jnp.float32)
  out = {}

  def add(name, values):
    out[name] = jnp.sum(values * mask)
    out[name + "/count"] = jnp.sum(mask)

  q = kind.value_estimate(kind.predict(candidate_z))
  g_next = _shift_left(targets.discounted_return(batch[rows.REMAINING], kind.gamma))
  add("candidate_value_mse", (q - g_next) ** 2)
  if rows.EXACT_VALUE in batch:
    exact_next = _shift_left(batch[rows.EXACT_VALUE])
    next_state = _shift_left(kind.value_estimate(kind.predict(z)))
    add("candidate_exact_mse", (q - exact_next) ** 2)
    add("next_state_exact_mse", (next_state - exact_next) ** 2)
    add("candidate_bayes_value_mse", (exact_next - g_next) ** 2)
  return out
