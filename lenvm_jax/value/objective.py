"""The training objective: token-mean squared error over the global batch, plus an optional LM term.

loss = value_weight * value MSE + lm_weight * LM cross-entropy; value_weight = 0 trains the trunk as a plain LM
(a policy to sample rollouts from; the value head then gets no gradient, its metrics are still reported).

lm_stride > 1 takes the LM term on every lm_stride-th position of a row only: with a 32k vocabulary and a small
trunk the LM head costs many times the trunk, so an auxiliary LM term is affordable only on a subset. Completions
are packed at arbitrary offsets, so a fixed stride samples every completion position alike.

boundary_weight > 1 counts each prompt-boundary state s_0 as that many tokens in the value MSE (a weighted token
mean). The weight depends only on the state, so the minimiser at every state is still E[G | state]; it moves capacity
toward the states that predict a whole completion's length before decoding (docs/method.md §8), which the token mean
gives ~1/L of the loss. 1 (the default) is the paper's plain token mean.

The LM term never holds the [tokens, vocab] logits whole (loss.lm_chunk, lm_cross_entropy_sum): at a 150k vocabulary
they and their gradient outweighed the whole rematerialised trunk of a 1.5B model (docs/scaling.md).

Functions here return *sums* and *counts*, never means: the trainer divides by the valid-token count of the whole
global batch (all micro-batches, all devices), so the gradient does not depend on how the batch is split, and a long
sequence weighs by its token count, not 1/L (paper appendix E). No 0.5 factor (the paper's convention).

data.unfinished='censored': the value positions of a cut completion (rows.CENSORED) know only that at least n more
tokens followed (n = the tokens left in the kept completion + 1), so their loss is one-sided (TargetKind.bound_loss:
only a prediction of a shorter remainder than the bound is penalised), with the same weights and token counts as
the rest of the value loss. The LM term reads such rows as ordinary text. loss.censored_bootstrap instead regresses
them on the return bootstrapped from the model's own value at the last kept state (the cut is a time limit), capped
by the bound (targets.censored_bootstrap_targets): the bound alone cannot say how far past it an answer went.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lenvm_jax.config import LossConfig
from lenvm_jax.data import rows
from lenvm_jax.model import transformer
from lenvm_jax.value import candidate, targets


@dataclasses.dataclass(frozen=True)
class LMHead:
  """What the LM term needs instead of its logits: the hidden states at the LM positions [B, T', H] and the head."""
  hidden: jax.Array
  weight: jax.Array  # [H, vocab], compute dtype.


def lm_cross_entropy_sum(hidden, weight, labels, mask, chunk: int = 0, unroll: bool = False):
  """Sum over mask of the next-token cross-entropy of logits = hidden @ weight (float32), [B, T, H] -> scalar.

  chunk > 0 computes the logits for `chunk` positions of every row at a time (a scan over time chunks, so each chunk
  keeps the batch's sharding) and rematerialises each chunk in the backward pass: the [B, T, vocab] logits and their
  gradient are never in memory whole, only one chunk's, for the cost of the head's forward matmul once more (8 N V
  FLOPs instead of 6). The rows are padded with masked positions to a whole number of chunks. Per position it is
  the same cross-entropy as chunk = 0 (only the order of the float32 sum differs). unroll: lower the chunk loop
  unrolled, for FLOP counting (XLA counts a loop body once; train/step.py train_step_flops).
  """
  def masked_ce(h, y, m):
    ce = optax.softmax_cross_entropy_with_integer_labels(transformer.lm_logits(h, weight), y)
    return jnp.sum(m.astype(jnp.float32) * ce)

  length = hidden.shape[1]
  if not chunk or chunk >= length:
    return masked_ce(hidden, labels, mask)
  chunks = -(-length // chunk)

  def to_chunks(x):  # [B, T, ...] -> [chunks, B, chunk, ...], padded.
    x = jnp.pad(x, [(0, 0), (0, chunks * chunk - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], chunks, chunk, *x.shape[2:]), 1, 0)

  body = jax.checkpoint(lambda total, xs: (total + masked_ce(*xs), None),
                        policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (to_chunks(hidden), to_chunks(labels), to_chunks(mask)),
                          unroll=unroll)
  return total


@dataclasses.dataclass(frozen=True)
class Objective:
  kind: targets.TargetKind
  gae_lambda: float = 1.0
  lm_weight: float = 0.0
  value_weight: float = 1.0
  boundary_weight: float = 1.0
  lm_stride: int = 1
  candidate_weight: float = 0.0  # > 0: the model has a candidate-value head, trained as value/candidate.py says.
  lm_chunk: int = 0  # Positions per row whose LM logits exist at once (lm_cross_entropy_sum); 0 = the whole row.
  unroll_lm_chunks: bool = False  # Lower the chunk loop unrolled (FLOP counting only).
  censored_bootstrap: bool = False  # Censored positions regress on targets.censored_bootstrap_targets.

  @classmethod
  def from_config(cls, loss: LossConfig) -> "Objective":
    """From a run's loss section; its gamma must be resolved (value/gamma.py)."""
    if not loss.resolved:
      raise ValueError(f"loss.gamma={loss.gamma!r} or loss.length_normalizer={loss.length_normalizer!r} is not "
                       "resolved yet (value/gamma.resolve)")
    kind = targets.TargetKind(loss.target_type, loss.gamma, loss.length_normalizer, loss.kind, loss.huber_delta,
                              loss.length_activation)
    return cls(kind, loss.gae_lambda, loss.lm_weight, loss.value_weight, loss.boundary_weight, loss.lm_stride,
               candidate_weight=loss.candidate_weight, lm_chunk=loss.lm_chunk,
               censored_bootstrap=loss.censored_bootstrap)

  def lm_positions(self, x, axis: int = -1):
    """The positions (along the time axis) that the LM term is taken on: every lm_stride-th."""
    return jax.lax.slice_in_dim(x, 0, None, self.lm_stride, axis)

  def value_targets(self, prediction, batch):
    if self.gae_lambda == 1.0:
      return self.kind.target(batch[rows.REMAINING])
    return targets.gae_targets(prediction, batch[rows.REMAINING], batch[rows.VALUE_MASK], batch[rows.SEGMENT_IDS],
                               self.kind.gamma, self.gae_lambda)

  def sums(self, z, lm_head: LMHead | None, batch, candidate_z=None):
    """Un-normalised loss pieces for one (micro-)batch: squared value error and (with lm_head) LM cross-entropy,
    summed; with candidate_z (the candidate head's logit of each realised next token, [B, T]) the candidate squared
    error."""
    prediction = self.kind.predict(z)
    target = jax.lax.stop_gradient(self.value_targets(prediction, batch))
    # "value_sq_err": the summed per-token loss (squared error, or Huber under loss.kind = "huber").
    per_token = self.kind.regression_loss(prediction, target)
    if rows.CENSORED in batch and self.censored_bootstrap:  # Bootstrapped from the last kept state, under the bound.
      bootstrapped = targets.censored_bootstrap_targets(prediction, batch[rows.REMAINING], batch[rows.CENSORED],
                                                        batch[rows.SEGMENT_IDS], self.kind.gamma)
      per_token = jnp.where(batch[rows.CENSORED], self.kind.regression_loss(prediction, bootstrapped), per_token)
    elif rows.CENSORED in batch:  # data.unfinished='censored': a cut completion's target is a bound (one-sided loss).
      per_token = jnp.where(batch[rows.CENSORED], self.kind.bound_loss(prediction, target), per_token)
    out = {"value_sq_err": jnp.sum(self.value_weights(batch) * per_token)}
    if lm_head is not None:
      out["lm_ce"] = lm_cross_entropy_sum(lm_head.hidden, lm_head.weight, self.lm_positions(batch[rows.LM_TARGETS]),
                                          self.lm_positions(batch[rows.LM_MASK]), self.lm_chunk,
                                          self.unroll_lm_chunks)
    if candidate_z is not None:
      out.update(candidate.sums(self.kind, candidate_z, target, batch))
    return out

  def loss(self, sums, value_count, lm_count, candidate_count=None):
    """Training loss from summed pieces and global token counts (candidate_count: candidate.count of the batch)."""
    loss = self.value_weight * sums["value_sq_err"] / jnp.maximum(value_count, 1.0)
    if "lm_ce" in sums:
      loss = loss + self.lm_weight * sums["lm_ce"] / jnp.maximum(lm_count, 1.0)
    if "candidate_sq_err" in sums:
      loss = loss + self.candidate_weight * sums["candidate_sq_err"] / jnp.maximum(candidate_count, 1.0)
    return loss


  def value_weights(self, batch):
    """Per-token weight of the value MSE: the value mask, with s_0 (completion_index 0) weighing boundary_weight."""
    mask = batch[rows.VALUE_MASK].astype(jnp.float32)
    if self.boundary_weight == 1.0:
      return mask
    return mask * jnp.where(batch[rows.COMPLETION_INDEX] == 0, jnp.float32(self.boundary_weight), 1.0)

  def token_counts(self, batch):
    """Global (weighted) valid-token counts of a batch (any leading dims): the loss denominators."""
    return jnp.sum(self.value_weights(batch)), jnp.sum(self.lm_positions(batch[rows.LM_MASK]).astype(jnp.float32))
