"""Regression targets (docs/method.md §2, §5), computed on device so gamma is only a config value; and, in numpy,
the prompt-boundary length L_GT and relative length error (§8) that evaluation and the gamma rules share.

`remaining` is the per-token count of tokens still to come, n_t = L - t, taken from the untruncated completion
length; -1 marks an unknown (infinite) remaining length: a completion that never emitted EOS, kept as G = -1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TARGET_TYPES = ("discounted", "raw_length", "normalized_length", "log_length")
LOSS_KINDS = ("mse", "huber")


def discounted_return(remaining, gamma: float):
  """G = -(1 - gamma ** n), written as expm1(n log gamma) for accuracy near n = 0; -1 where n is infinite."""
  n = remaining.astype(jnp.float32)
  g = jnp.expm1(n * jnp.log(jnp.float32(gamma)))
  return jnp.where(remaining < 0, -1.0, g)


def remaining_from_value(value, gamma: float):
  """Exact inverse of discounted_return: n = log(1 + V) / log(gamma); V is clipped just inside (-1, 0]."""
  v = jnp.clip(jnp.asarray(value).astype(jnp.float32), -1.0 + 1e-7, 0.0)
  return jnp.log1p(v) / jnp.log(jnp.float32(gamma))


def log1p_value_from_logit(z):
  """log(1 + V) for V = -sigmoid(z), as log_sigmoid(-z): exact in float32 where V itself rounds to -1 (a remainder
  past ~5,300 tokens at gamma 0.997), so lengths read from the head's logit never saturate."""
  return jax.nn.log_sigmoid(-jnp.asarray(z).astype(jnp.float32))


def remaining_from_logit(z, gamma: float):
  """n = log(1 + V) / log(gamma) from the value head's logit z (V = -sigmoid(z)), exact far past float32's V."""
  return log1p_value_from_logit(z) / jnp.log(jnp.asarray(gamma, jnp.float32))


def logit_from_remaining(remaining, gamma: float):
  """The inverse of remaining_from_logit: z with -sigmoid(z) = -(1 - gamma ** n), i.e. logit(1 - gamma ** n)."""
  log_w = jnp.asarray(remaining).astype(jnp.float32) * jnp.log(jnp.asarray(gamma, jnp.float32))  # log(gamma ** n)
  return jnp.log(-jnp.expm1(log_w)) - log_w


def token_reward(gamma: float) -> float:
  """r = -(1 - gamma): the reward of every generated token, so that the rewards of n tokens sum (discounted) to G."""
  return -(1.0 - gamma)


def prompt_boundary_lengths(lengths, group_index, group_count: int, gamma: float) -> np.ndarray:
  """[group_count] L_GT: per group, the length whose return is the mean return of its completion lengths,
  log(mean(gamma ** L)) / log(gamma) (the inverse of discounted_return at the mean return). lengths [N] and
  group_index [N] (each length's group) are flat, so many groups cost a few numpy passes."""
  # Summed in log space: gamma ** L underflows to 0 for long L.
  log_terms = np.asarray(lengths, np.float64) * np.log(gamma)
  group_index = np.asarray(group_index, np.int64)
  top = np.full(group_count, -np.inf)
  np.maximum.at(top, group_index, log_terms)
  total = np.bincount(group_index, np.exp(log_terms - top[group_index]), group_count)
  return (top + np.log(total / np.bincount(group_index, minlength=group_count))) / np.log(gamma)


def groups_boundary_lengths(groups: dict, gamma: float) -> np.ndarray:
  """L_GT of every group of {key: [completion lengths]}, in the dict's order."""
  sizes = [len(v) for v in groups.values()]
  lengths = np.concatenate([np.asarray(v, np.float64) for v in groups.values()]) if sizes else np.zeros(0)
  return prompt_boundary_lengths(lengths, np.repeat(np.arange(len(sizes)), sizes), len(sizes), gamma)


def prompt_boundary_length(lengths, gamma: float) -> float:
  """L_GT of one prompt group from its sampled completion lengths."""
  return float(prompt_boundary_lengths(lengths, np.zeros(len(lengths), np.int64), 1, gamma)[0])


def relative_length_error(predicted, true):
  """|L_hat - L| / L, with L below 1 token counted as 1 so that a prompt answered by EOS alone does not divide by ~0."""
  return np.abs(predicted - true) / np.maximum(true, 1.0)


@dataclasses.dataclass(frozen=True)
class TargetKind:
  """How the value-head logit z becomes a prediction, what it regresses on with which per-token loss, and how to
  read a length back.

  `discounted` is the LenVM target. The others are the paper's section 5.1 ablations: raw length + softplus,
  length / length_normalizer + sigmoid (not clipped; with length_activation "softplus" the reference's default link,
  which reaches targets above 1, so a constant normaliser shorter than the lengths still fits), log1p(length) +
  softplus. `loss` is "mse" (d ** 2) or "huber" (torch's huber_loss: 0.5 d ** 2 for |d| <= delta,
  delta (|d| - delta / 2) beyond), the reference's loss for every target type.
  """
  name: str
  gamma: float
  length_normalizer: float
  loss: str = "mse"
  huber_delta: float = 1.0
  length_activation: str = "sigmoid"  # normalized_length only: "sigmoid" | "softplus".

  def __post_init__(self):
    if self.name not in TARGET_TYPES:
      raise ValueError(f"loss.target_type must be one of {TARGET_TYPES}, got {self.name!r}")
    if self.loss not in LOSS_KINDS:
      raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {self.loss!r}")
    if self.length_activation not in ("sigmoid", "softplus"):
      raise ValueError(f"loss.length_activation must be 'sigmoid' or 'softplus', got {self.length_activation!r}")
    if self.name == "normalized_length" and not self.length_normalizer > 0:
      raise ValueError(f"loss.length_normalizer must be resolved to a positive length, got {self.length_normalizer}")

  def regression_loss(self, prediction, target):
    """Per-token loss of a prediction against its target (both [...], float32)."""
    error = prediction - target
    if self.loss == "mse":
      return error**2
    magnitude = jnp.abs(error)
    return jnp.where(magnitude <= self.huber_delta, 0.5 * error**2,
                     self.huber_delta * (magnitude - 0.5 * self.huber_delta))

  def bound_loss(self, prediction, bound):
    """Per-token one-sided loss against the target of a lower bound on the remaining length (a cut completion): the
    regression loss of how far the prediction claims a shorter remainder than the bound, 0 where it does not (no
    gradient either). The discounted value decreases in n (V <= G_bound is the bound), the length targets increase."""
    shortfall = prediction - bound if self.name == "discounted" else bound - prediction
    return self.regression_loss(jnp.maximum(shortfall, 0.0), 0.0)

  def predict(self, z):
    if self.name == "discounted":
      return -jax.nn.sigmoid(z)
    if self.name == "normalized_length" and self.length_activation == "sigmoid":
      return jax.nn.sigmoid(z)
    return jax.nn.softplus(z)

  def target(self, remaining):
    n = remaining.astype(jnp.float32)
    if self.name == "discounted":
      return discounted_return(remaining, self.gamma)
    if self.name == "raw_length":
      return n
    if self.name == "normalized_length":
      return n / self.length_normalizer
    return jnp.log1p(n)

  def remaining_estimate(self, prediction):
    """Predicted remaining length n_hat from a prediction."""
    if self.name == "discounted":
      return remaining_from_value(prediction, self.gamma)
    if self.name == "raw_length":
      return prediction
    if self.name == "normalized_length":
      return prediction * self.length_normalizer
    return jnp.expm1(prediction)

  def discounted_logit(self, z):
    """The head's logit z as the logit of the discounted value (V = -sigmoid(result)) whatever the target type,
    so guidance can read lengths from it exactly (remaining_from_logit); the discounted target's is z itself."""
    if self.name == "discounted":
      return jnp.asarray(z).astype(jnp.float32)
    return logit_from_remaining(jnp.maximum(self.remaining_estimate(self.predict(z)), 0.0), self.gamma)

  def remaining_from_logit(self, z):
    """Predicted remaining length n_hat straight from the head's logit (exact in float32 for the discounted target,
    where remaining_estimate(predict(z)) saturates once V rounds to -1)."""
    if self.name == "discounted":
      return remaining_from_logit(z, self.gamma)
    return self.remaining_estimate(self.predict(z))

  def value_estimate(self, prediction):
    """The prediction expressed as a discounted value V in (-1, 0], so every target type is comparable."""
    if self.name == "discounted":
      return prediction
    return discounted_return(self.remaining_estimate(prediction), self.gamma)


def censored_bootstrap_targets(values, remaining, censored, segment_ids, gamma: float):
  """Targets of a cut completion's positions that bootstrap from the model's own value at its last kept state: the cut
  is a time limit, not an end, so G_t = -(1 - gamma ** k) + gamma ** k V(s_last) with k = the tokens from t to that
  state (the last censored position of the sequence in the row), and no more than the bound G(remaining) that the
  cut itself proves. values [B, T] are held fixed (stop-gradient); elsewhere the result is meaningless (masked)."""
  values = jax.lax.stop_gradient(values.astype(jnp.float32))
  censored = censored.astype(bool)
  same = censored[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])
  is_last = censored & ~jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
  length = censored.shape[1]
  index = jnp.broadcast_to(jnp.arange(length), censored.shape)
  last = jnp.minimum(jax.lax.cummin(jnp.where(is_last, index, length), axis=1, reverse=True), length - 1)
  steps = (remaining - jnp.take_along_axis(remaining, last, axis=1)).astype(jnp.float32)
  weight = jnp.exp(steps * jnp.log(jnp.float32(gamma)))
  bootstrapped = -(1.0 - weight) + weight * jnp.take_along_axis(values, last, axis=1)
  return jnp.minimum(bootstrapped, discounted_return(remaining, gamma))


def gae_targets(values, remaining, value_mask, segment_ids, gamma: float, lam: float):
  """GAE(lambda) value targets (lambda-returns), with the values held fixed (stop-gradient).

  G^lam_t = r + gamma * ((1 - lam) V_{t+1} + lam G^lam_{t+1}) with r = -(1 - gamma), built backwards along each
  sequence. The recursion starts from the Monte-Carlo return at the last position of a sequence present in the
  row (EOS has G = 0; a row cut at max_len keeps its true return), so lam = 1 is exactly the Monte-Carlo return.
  All arrays are [B, T]; positions outside value_mask get the Monte-Carlo return and are masked by the loss.
  """
  values = jax.lax.stop_gradient(values.astype(jnp.float32))
  mc = discounted_return(remaining, gamma)
  mask = value_mask.astype(bool)
  # Position t continues into t + 1 when both are value positions of the same sequence.
  continues = mask[:, :-1] & mask[:, 1:] & (segment_ids[:, :-1] == segment_ids[:, 1:])
  continues = jnp.concatenate([continues, jnp.zeros_like(continues[:, :1])], axis=1)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  next_is_eos = jnp.concatenate([remaining[:, 1:] == 0, jnp.zeros_like(mask[:, :1])], axis=1)
  next_values = jnp.where(next_is_eos, 0.0, next_values)  # The terminal state's value is 0, not the model's.
  reward = token_reward(gamma)

  def step(next_return, xs):
    cont, v_next, mc_t = xs
    bootstrapped = reward + gamma * ((1.0 - lam) * v_next + lam * next_return)
    ret = jnp.where(cont, bootstrapped, mc_t)
    return ret, ret

  columns = lambda a: jnp.moveaxis(a, 1, 0)[::-1]
  _, returns = jax.lax.scan(step, jnp.zeros(values.shape[0], jnp.float32),
                            (columns(continues), columns(next_values), columns(mc)))
  return jnp.moveaxis(returns[::-1], 0, 1)
