"""The metrics of docs/method.md §8, as sums that add up exactly across batches, devices and eval shards.

`metric_sums` returns {name: sum} plus {name + "/count": count}; `finalize` divides. Length metrics skip tokens
whose true remaining length is unknown (unfinished completions kept as infinite, or censored ones: their
`remaining` is only a bound); relative errors also skip EOS (n = 0). On synthetic data exact_value_mse is the
prediction's MSE against the exact value function (bayes_value_mse is the exact value's own MSE against G).
Per-position metrics take one token per sequence at t = floor(f * L) for f in POSITION_FRACTIONS.
"""

import jax.numpy as jnp

from lenvm_jax.data import rows
from lenvm_jax.value import targets

POSITION_FRACTIONS = (0, 25, 50, 75)


def _add(out, name, values, mask):
  mask = mask.astype(jnp.float32)
  out[name] = jnp.sum(values * mask)
  out[name + "/count"] = jnp.sum(mask)


def metric_sums(z, batch, kind: targets.TargetKind):
  prediction = kind.predict(z)
  value_hat = kind.value_estimate(prediction)
  n_hat = kind.remaining_estimate(prediction)
  remaining = batch[rows.REMAINING]
  g = targets.discounted_return(remaining, kind.gamma)
  n = remaining.astype(jnp.float32)
  valid = batch[rows.VALUE_MASK].astype(bool)
  # A censored token's `remaining` is a lower bound, not a length (data.unfinished='censored'): the MSE and length
  # metrics skip it; censored_violation says how often the prediction claims a shorter remainder than the bound.
  censored = batch[rows.CENSORED].astype(bool) if rows.CENSORED in batch else jnp.zeros_like(valid)
  mask = valid & ~censored
  known = mask & (remaining >= 0)
  abs_err = jnp.abs(n_hat - n)
  rel_err = abs_err / jnp.maximum(n, 1.0)

  out = {}
  _add(out, "value_mse", (value_hat - g) ** 2, mask)
  _add(out, "length_mae", abs_err, known)
  _add(out, "length_mre", rel_err, known & (remaining > 0))
  index, length = batch[rows.COMPLETION_INDEX], batch[rows.COMPLETION_LENGTH]
  for f in POSITION_FRACTIONS:
    at = known & (remaining > 0) & (index == (length * f) // 100)
    _add(out, f"length_mae_at_{f}", abs_err, at)
    _add(out, f"length_mre_at_{f}", rel_err, at)
  # Reference predictors on the same tokens: the best constant (from the first two moments of G) and, when the
  # data knows it (synthetic source), the exact value function.
  _add(out, "return_mean", g, mask)
  _add(out, "return_sq_mean", g * g, mask)
  if rows.CENSORED in batch:
    _add(out, "censored_violation", (value_hat > g).astype(jnp.float32), valid & censored)
  if rows.EXACT_VALUE in batch:
    _add(out, "bayes_value_mse", (batch[rows.EXACT_VALUE] - g) ** 2, mask)
    # The gap to the exact value function itself, over every state (a cut completion's states have exact values too).
    _add(out, "exact_value_mse", (value_hat - batch[rows.EXACT_VALUE]) ** 2, valid)
  return out


def finalize(sums) -> dict:
  """Means from accumulated sums; adds const_value_mse (best constant = mean G) when its moments are present."""
  sums = {k: float(v) for k, v in sums.items()}
  out = {k: sums[k] / max(sums[k + "/count"], 1.0) for k in sums if not k.endswith("/count")}
  if "return_mean" in out:
    out["const_value_mse"] = max(out.pop("return_sq_mean") - out.pop("return_mean") ** 2, 0.0)
  return out
