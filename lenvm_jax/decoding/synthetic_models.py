"""The synthetic policy (lenvm_jax/data/synthetic.py) as a JAX generator, and its exact value function as a scorer.

They plug into guided decoding (lenvm_jax/decoding/guided.py) like trained models: the exact scorer tests the
guidance rules without any learning error, and the generator lets a LenVM trained on synthetic data steer the very
policy that produced its training data. State per row: the hidden mode (the last mode / switch token seen).

`filler_tokens` lets the generator spread its filler probability over fewer filler ids: the value function does
not depend on which filler is emitted, so values stay exact, but EOS and the switch tokens then rank among the few
most likely tokens, where a small candidate set (top-k) can see them.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from lenvm_jax.data.synthetic import EOS_ID, SyntheticPolicy


def _mode_of_prompt(policy: SyntheticPolicy, prompt_tokens):
  """[B] mode of each prompt: its (last) mode token."""
  is_mode = (prompt_tokens >= policy.mode_token(0)) & (prompt_tokens < policy.switch_token(0))
  last = prompt_tokens.shape[1] - 1 - jnp.argmax(is_mode[:, ::-1], axis=1)
  return jnp.take_along_axis(prompt_tokens, last[:, None], axis=1)[:, 0] - policy.mode_token(0)


def _next_mode(policy: SyntheticPolicy, modes, tokens):
  is_switch = (tokens >= policy.switch_token(0)) & (tokens < policy.first_filler)
  return jnp.where(is_switch, tokens - policy.switch_token(0), modes)


@dataclasses.dataclass(frozen=True)
class SyntheticGenerator:
  """Next-token log-probabilities of the synthetic policy (params unused: pass None)."""
  policy: SyntheticPolicy
  filler_tokens: int = 0  # > 0: only the first n filler ids carry the filler probability (0 = all, as in data).

  def __post_init__(self):
    available = self.policy.vocab_size - self.policy.first_filler
    if not 0 <= self.filler_tokens <= available:
      raise ValueError(f"filler_tokens must lie in [0, {available}], got {self.filler_tokens}")

  @property
  def vocab_size(self) -> int:
    return self.policy.vocab_size

  def log_probs(self) -> np.ndarray:
    """[modes, vocab] next-token log-probabilities in each mode."""
    p = self.policy
    fillers = self.filler_tokens or p.vocab_size - p.first_filler
    h = np.asarray(p.hazards, np.float64)[:, None]
    probs = np.zeros((p.num_modes, p.vocab_size))
    probs[:, EOS_ID] = h[:, 0]
    probs[:, p.switch_token(0):p.first_filler] = (1 - h) * p.switch_prob / p.num_modes
    probs[:, p.first_filler:p.first_filler + fillers] = (1 - h) * (1 - p.switch_prob) / fillers
    with np.errstate(divide="ignore"):
      return np.log(probs).astype(np.float32)

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    del params, prompt_lengths, cache_len
    modes = _mode_of_prompt(self.policy, prompt_tokens)
    return modes, jnp.asarray(self.log_probs())[modes]

  def advance(self, params, modes, tokens, positions):
    del params, positions
    modes = _next_mode(self.policy, modes, tokens)
    return modes, jnp.asarray(self.log_probs())[modes]


@dataclasses.dataclass(frozen=True)
class SyntheticScorer:
  """The exact V(s_t + x) of the synthetic policy, as the logit z of V = -sigmoid(z) (params unused: pass None)."""
  policy: SyntheticPolicy
  gamma: float

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    del params, prompt_lengths, cache_len
    return _mode_of_prompt(self.policy, prompt_tokens)

  def score(self, params, modes, candidates, positions):
    """The exact logit z of V(s_t + x) = -sigmoid(z) (from float64 values; EOS: a z whose V rounds to 0)."""
    del params, positions
    next_modes = _next_mode(self.policy, modes[:, None], candidates)
    values = self.policy.mode_values(self.gamma)
    logits = jnp.asarray(np.log(-values) - np.log1p(values), jnp.float32)[next_modes]
    return jnp.where(candidates == EOS_ID, -100.0, logits), next_modes

  def commit(self, params, modes, next_modes, choice):
    del params, modes
    return jnp.take_along_axis(next_modes, choice[:, None], axis=1)[:, 0]
