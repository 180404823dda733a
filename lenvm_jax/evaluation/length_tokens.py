"""Length tokens (docs/method.md §10, paper 4.6): tokens after which the expected continuation jumps.

The TD residual of a step s_{t-1} -> s_t is s_t = r + gamma * V_t - V_{t-1} with r = -(1 - gamma): zero when the
value is self-consistent, so |s_t| > threshold marks a token that changed the expected remaining length. Sign with
V = -sigmoid(z) in (-1, 0] (more negative = longer): s_t < 0 means the new token made the continuation *longer*
(a lengthening token), s_t > 0 *shorter*. The paper's prose uses u = -V, with the opposite sign; we report the
direction by name.
"""

import collections

import numpy as np

from lenvm_jax.value.targets import token_reward


def td_residuals(values, gamma: float) -> np.ndarray:
  """[L] residuals of the tokens 1..L of a value sequence V_0..V_L (V at s_0 .. s_L)."""
  v = np.asarray(values, np.float64)
  return token_reward(gamma) + gamma * v[1:] - v[:-1]


def length_tokens(sequences, gamma: float, threshold: float = 0.01, top: int = 20) -> dict:
  """Top lengthening / shortening tokens over a corpus.

  sequences: iterable of (completion token ids [L], values [L + 1] at s_0 .. s_L). A token counts once per
  occurrence whose residual passes the threshold. Tokens are ranked by that count (ties: larger mean |residual|).
  Returns {"lengthening": [...], "shortening": [...], "occurrences": n, "marked": m}, each entry
  {"token", "count", "occurrences", "mean_residual"}.
  """
  residual_sums = collections.defaultdict(float)
  occurrences = collections.Counter()
  lengthening, shortening = collections.Counter(), collections.Counter()
  total = 0
  for tokens, values in sequences:
    tokens = np.asarray(tokens)
    residuals = td_residuals(values, gamma)
    if len(residuals) != len(tokens):
      raise ValueError(f"need len(tokens) + 1 values, got {len(tokens)} tokens and {len(residuals) + 1} values")
    total += len(tokens)
    for token, s in zip(tokens.tolist(), residuals.tolist()):
      occurrences[token] += 1
      residual_sums[token] += s
      if s < -threshold:
        lengthening[token] += 1
      elif s > threshold:
        shortening[token] += 1

  def ranked(counter):
    entries = [{"token": token, "count": count, "occurrences": occurrences[token],
                "mean_residual": residual_sums[token] / occurrences[token]} for token, count in counter.items()]
    entries.sort(key=lambda e: (-e["count"], -abs(e["mean_residual"]), e["token"]))
    return entries[:top]

  return {"lengthening": ranked(lengthening), "shortening": ranked(shortening), "occurrences": total,
          "marked": int(sum(lengthening.values()) + sum(shortening.values()))}
