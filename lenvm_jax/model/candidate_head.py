"""The candidate-value head: Q(s_t, x) ~ V(s_t + x) for every next token x at once, read from h_t alone.

    g   = W2 . SiLU(W1 . h + b1) + b2            (W1: H x H, W2: H x H; float32)
    z_q = stop_gradient(z_v(h)) + g . w_x + b_x  (z_v: the value head's logit at the same state)
    Q   = the run's target kind applied to z_q    (-sigmoid(z_q) for the LenVM target, as V = -sigmoid(z_v))

w_x is a per-token vector: its own [vocab, H] table (`table`, zero-initialised) or the input embedding row of x
(`tied`); b_x a per-token bias. Why the value head's logit as the base: most tokens barely move the value, so the head
learns the change a token makes, and a token never seen as a next token (w_x decayed to 0, b_x = 0) keeps Q = V(s_t),
not an arbitrary value. The base is held fixed (stop-gradient) so that the candidate loss never pulls the value head
toward the next state's value.

Why it is cheap: for k candidates, Q is k dot products on the hidden state the decode step computed anyway; all
tokens at once is one [H] x [H, vocab] matmul. What it cannot know: x never attends to the prefix, so the change x
makes is a bilinear form of (h_t, w_x); the next-state scorer (x run through the trunk) sees x's effect on attention.
"""

import jax
import jax.numpy as jnp
from flax import nnx

_init = nnx.initializers.normal(stddev=0.02)


class CandidateValueHead(nnx.Module):
  """g(h) and the per-token vectors; the caller adds the value head's logit (LengthValueModel.candidate_logits)."""

  def __init__(self, hidden_size: int, vocab_size: int, tied: bool, rngs: nnx.Rngs):
    h = hidden_size
    self.tied = tied
    self.fc = nnx.Param(_init(rngs.params(), (h, h), jnp.float32), logical_axes=("embed", "value_hidden"))
    self.fc_bias = nnx.Param(jnp.zeros((h,), jnp.float32), logical_axes=("value_hidden",))
    self.out = nnx.Param(_init(rngs.params(), (h, h), jnp.float32), logical_axes=("value_hidden", "embed"))
    self.out_bias = nnx.Param(jnp.zeros((h,), jnp.float32), logical_axes=("embed",))
    if not tied:
      # Zero rows: an untrained token changes nothing (Q = V); g then gets its gradient once the rows move.
      self.table = nnx.Param(jnp.zeros((vocab_size, h), jnp.float32), logical_axes=("vocab", "embed"))
    self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32), logical_axes=("vocab",))

  def features(self, hidden):
    """g(h) [..., H] float32."""
    h = jax.nn.silu(hidden.astype(jnp.float32) @ self.fc[...] + self.fc_bias[...])
    return h @ self.out[...] + self.out_bias[...]

  def token_vectors(self, embedding):
    """[vocab, H] float32: w_x for every token (the table, or the input embedding when tied)."""
    return (embedding if self.tied else self.table[...]).astype(jnp.float32)

  def deltas(self, features, vectors, token_ids=None):
    """g . w_x + b_x: for token_ids [..., k] (one set per state), [..., k]; without token_ids, every token
    [..., vocab]."""
    if token_ids is None:
      return features @ vectors.T + self.bias[...]
    return jnp.einsum("...h,...kh->...k", features, vectors[token_ids]) + self.bias[...][token_ids]
