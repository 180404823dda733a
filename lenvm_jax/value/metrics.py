"""Spec section 4 metrics, as sums that add up exactly across batches, devices and eval shards.

`metric_sums` returns {name: sum} plus {name + "/count": count}; `finalize` divides. Length metrics skip tokens
whose true remaining length is unknown (unfinished completions); relative errors also skip EOS (n = 0).
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
  mask = batch[rows.VALUE_MASK].astype(bool)
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
  if rows.EXACT_VALUE in batch:
    _add(out, "bayes_value_mse", (batch[rows.EXACT_VALUE] - g) ** 2, mask)
  return out


def finalize(sums) -> dict:
  """Means from accumulated sums; adds const_value_mse (best constant = mean G) when its moments are present."""
  sums = {k: float(v) for k, v in sums.items()}
  out = {k: sums[k] / max(sums[k + "/count"], 1.0) for k in sums if not k.endswith("/count")}
  if "return_mean" in out:
    out["const_value_mse"] = max(out.pop("return_sq_mean") - out.pop("return_mean") ** 2, 0.0)
  return out
