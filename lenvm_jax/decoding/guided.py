"""Length-guided decoding (spec section 5): a generator proposes, a LenVM scores, a per-row rule chooses.

Each step, per row: the generator's logits go through the sampling filters (temperature, top-k, top-p, min-p;
lenvm_jax/decoding/sampler.py), the `num_candidates` most likely surviving tokens are the candidates, and the LenVM
scores every candidate x as V(s_t + x) in (-1, 0] (more negative = more tokens expected to follow; an EOS
candidate is 0). All candidates of all rows are scored in one batched forward over the LenVM's prefix cache,
each candidate seeing the prefix and itself only; the chosen candidate's keys and values are then committed, so
the prefix is never recomputed (lenvm_jax/decoding/guided_models.py).

Rules (per row, in one batch). Lengths count the EOS token; R = max(target - generated - target_offset, 0) is the
number of tokens still wanted after the candidate (target_offset 1: the candidate itself is one of the target's
tokens; 0: the reference's R = max(T - generated, 0)), and v*(R) = -(1 - gamma ** R) is the value of exactly R more
tokens (targets.discounted_return):
  none      sample from the base distribution over the candidates;
  equal_to  the candidate closest to R: in value space |V - v*(R)| (space="value", the paper's), or in length space
            |n(V) - R| with n(V) = log(1 + V) / log(gamma) (space="length", the reference's); ties: the more likely;
  at_most   selection="paper" / "reference": the candidate with the largest V (the shortest), always;
            selection="sample_fitting": sample among candidates expected to fit, V >= v*(R), else the shortest;
  at_least  selection="paper": the candidate with the smallest V (the longest), always (the row then ends at
            max_new_tokens unless EOS is the only candidate); "reference": the longest until the budget is met
            (R = 0), then the shortest (EOS if offered); "sample_fitting": until R = 0, sample among candidates
            expected to reach the target, V <= v*(R), else the longest; then the shortest;
  tilt      sample from p'(x) ~ p(x) exp(beta * u(x)) with u = -V = sigmoid(z) in [0, 1) (the reference's sign):
            beta < 0 favours short continuations, beta > 0 long ones, beta = 0 is the base model.
Deterministic choices break ties toward the more likely candidate (candidates come sorted by probability), as the
reference does. `LengthRequest.following(convention, ...)` sets selection, space and target_offset together:
"paper" (the default), "reference", or "sample_fitting" (this framework's earlier rules).
"""

import dataclasses
import functools
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lenvm_jax import sharding
from lenvm_jax.value.targets import discounted_return, remaining_from_value
from lenvm_jax.decoding.sampler import (PAD_ID, SamplingConfig, check_batch_size, filter_logits, prompt_batches,
                                        row_keys, step_keys)

RULES = ("none", "equal_to", "at_most", "at_least", "tilt")
_NONE, _EQUAL_TO, _AT_MOST, _AT_LEAST, _TILT = range(len(RULES))
SELECTIONS = ("paper", "reference", "sample_fitting")  # How at_most / at_least pick among the candidates.
_PAPER, _REFERENCE, _SAMPLE_FITTING = range(len(SELECTIONS))
SPACES = ("value", "length")  # Where equal_to measures the distance to the target.
# Named sets of (selection, space, target_offset): the paper's rules, the reference code's, and the sampling rules
# this framework used before (at_most / at_least sample among the candidates that fit).
CONVENTIONS = {
    "paper": dict(selection="paper", space="value", target_offset=1),
    "reference": dict(selection="reference", space="length", target_offset=0),
    "sample_fitting": dict(selection="sample_fitting", space="value", target_offset=1),
}


@dataclasses.dataclass(frozen=True)
class LengthRequest:
  """One row's length instruction: a rule, its target length in tokens (EOS included), beta for `tilt`, and how the
  rule is applied (module docstring): selection for at_most / at_least, space for equal_to, and target_offset
  (R = max(target - generated - target_offset, 0)) for all three. The defaults are the paper's rules."""
  rule: str = "none"
  target: int = 0
  beta: float = 0.0
  selection: str = "paper"
  space: str = "value"
  target_offset: int = 1

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"length rule must be one of {RULES}, got {self.rule!r}")
    if self.rule in ("equal_to", "at_most", "at_least") and self.target <= 0:
      raise ValueError(f"length rule {self.rule!r} needs a positive target, got {self.target}")
    if not np.isfinite(self.beta):
      raise ValueError(f"tilt beta must be finite, got {self.beta}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"length selection must be one of {SELECTIONS}, got {self.selection!r}")
    if self.space not in SPACES:
      raise ValueError(f"equal_to space must be one of {SPACES}, got {self.space!r}")
    if self.target_offset not in (0, 1):
      raise ValueError(f"target_offset must be 1 (the target counts the candidate) or 0 (the reference's), "
                       f"got {self.target_offset!r}")

  @classmethod
  def following(cls, convention: str, rule: str = "none", target: int = 0, beta: float = 0.0) -> "LengthRequest":
    """A request under a named set of rules: "paper", "reference" or "sample_fitting" (CONVENTIONS)."""
    if convention not in CONVENTIONS:
      raise ValueError(f"length rule convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    return cls(rule, target, beta, **CONVENTIONS[convention])


class GuidedModels(Protocol):
  """A generator and a LenVM decoding together (two models, or one shared trunk); pure functions of params."""
  vocab_size: int
  gamma: float

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    """Prefill of left-padded prompts [B, P]: (state, next-token logits [B, V])."""

  def score(self, params, state, candidates, positions):
    """V(s_t + x) [B, k] of candidates [B, k] at positions [B], without committing: (values, pending)."""

  def commit(self, params, state, pending, choice, tokens, positions):
    """Appends the chosen candidates (index choice [B], ids tokens [B]): (state, next-token logits [B, V])."""


def choose(candidate_logits, values, rules, targets, betas, generated, keys, gamma: float, selections=None,
           spaces=None, target_offsets=None):
  """Index [B] of the chosen candidate per row (see the module docstring for the rules).

  candidate_logits [B, k] (filtered; -inf = not allowed, at least one allowed per row, sorted by probability),
  values [B, k] in (-1, 0], rules / targets / generated [B] int32, betas [B] float32, keys [B] PRNG keys;
  selections / spaces [B] int32 (indices into SELECTIONS / SPACES) and target_offsets [B] int32 default to the
  paper's rules (selection "paper", value space, offset 1).
  """
  zeros = jnp.zeros_like(rules)
  selections = zeros + _PAPER if selections is None else selections
  spaces = zeros if spaces is None else spaces
  target_offsets = zeros + 1 if target_offsets is None else target_offsets
  allowed = jnp.isfinite(candidate_logits)
  length_score = -values  # u in [0, 1): larger = longer.
  remaining = jnp.maximum(targets - generated - target_offsets, 0)
  v_star = discounted_return(remaining, gamma)[:, None]
  budget_met = remaining == 0
  # One Gumbel draw per row serves every sampling rule (argmax of logits + Gumbel noise is a categorical sample);
  # a row uses one rule, so sharing the noise across rules changes nothing and saves the random-bit generation.
  gumbel = jax.vmap(lambda key: jax.random.gumbel(key, candidate_logits.shape[-1:]))(keys)
  sample = lambda logits: jnp.argmax(logits + gumbel, axis=-1)
  first_allowed_min = lambda cost: jnp.argmin(jnp.where(allowed, cost, jnp.inf), axis=-1)
  shortest = first_allowed_min(length_score)
  longest = first_allowed_min(-length_score)
  base = sample(candidate_logits)
  value_distance = jnp.abs(values - v_star)
  length_distance = jnp.abs(remaining_from_value(values, gamma) - remaining[:, None].astype(jnp.float32))
  equal_to = first_allowed_min(jnp.where((spaces == 1)[:, None], length_distance, value_distance))

  def sample_within(fits, fallback):
    fits = fits & allowed
    return jnp.where(jnp.any(fits, axis=-1), sample(jnp.where(fits, candidate_logits, -jnp.inf)), fallback)

  at_most = jnp.where(selections == _SAMPLE_FITTING, sample_within(values >= v_star, shortest), shortest)
  at_least = jnp.select(
      [selections == _PAPER, budget_met],
      [longest, shortest],
      jnp.where(selections == _REFERENCE, longest, sample_within(values <= v_star, longest)))
  tilt = sample(jnp.where(allowed, candidate_logits + betas[:, None] * length_score, -jnp.inf))
  return jnp.select([rules == _EQUAL_TO, rules == _AT_MOST, rules == _AT_LEAST, rules == _TILT],
                    [equal_to, at_most, at_least, tilt], base).astype(jnp.int32)


def guided_decode(models: GuidedModels, params, prompt_tokens, prompt_lengths, row_ids, rules, targets, betas,
                  selections, spaces, target_offsets, *, sampling: SamplingConfig, num_candidates: int):
  """Pure guided generation of one batch (prompt_tokens [B, P] left-padded; per-row request fields [B], see
  `choose`).

  Returns tokens [B, max_new_tokens] (PAD_ID after a row's end), values [B, max_new_tokens] (V of the state after
  each chosen token, 0 after the end), lengths [B] (EOS included) and finished [B].
  """
  batch, width = prompt_tokens.shape
  steps = sampling.max_new_tokens
  eos_ids = jnp.asarray(sampling.eos_ids, jnp.int32)
  keys = row_keys(sampling.seed, row_ids)
  state, logits = models.start(params, prompt_tokens, prompt_lengths, width + steps)

  def keep_going(carry):
    step, _, _, _, _, done, _ = carry
    return (step < steps) & ~jnp.all(done)

  def step_once(carry):
    step, state, logits, out, out_values, done, lengths = carry
    candidate_logits, candidates = jax.lax.top_k(filter_logits(logits, sampling), num_candidates)
    positions = prompt_lengths + step
    values, pending = models.score(params, state, candidates, positions)
    values = jnp.where(jnp.isin(candidates, eos_ids), 0.0, values)
    choice = choose(candidate_logits, values, rules, targets, betas, lengths, step_keys(keys, step), models.gamma,
                    selections, spaces, target_offsets)
    token = jnp.where(done, PAD_ID, jnp.take_along_axis(candidates, choice[:, None], axis=1)[:, 0])
    value = jnp.where(done, 0.0, jnp.take_along_axis(values, choice[:, None], axis=1)[:, 0])
    out, out_values = out.at[:, step].set(token), out_values.at[:, step].set(value)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    state, logits = models.commit(params, state, pending, choice, token, positions)
    return step + 1, state, logits, out, out_values, done, lengths

  carry = (jnp.zeros((), jnp.int32), state, logits, jnp.full((batch, steps), PAD_ID, jnp.int32),
           jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
  _, _, _, out, out_values, done, lengths = jax.lax.while_loop(keep_going, step_once, carry)
  return out, out_values, lengths, done


@dataclasses.dataclass(frozen=True)
class GuidedSample:
  completion_ids: np.ndarray  # Generated tokens, ending with an EOS id when finished.
  values: np.ndarray  # V after each generated token (the LenVM's view of the remaining length along the way).
  finished: bool


class GuidedSampler:
  """Guided generation for many prompts in fixed-size batches on a mesh (batch over data x fsdp)."""

  def __init__(self, models: GuidedModels, params, sampling: SamplingConfig, mesh, num_candidates: int = 5,
               batch_size: int = 16):
    check_batch_size(mesh, batch_size)
    if sampling.temperature == 0.0:
      raise ValueError("guided decoding samples among candidates: sampling temperature must be > 0")
    if not 1 <= num_candidates <= models.vocab_size:
      raise ValueError(f"num_candidates must lie in [1, {models.vocab_size}], got {num_candidates}")
    self.models, self.params, self.sampling, self.mesh = models, params, sampling, mesh
    self.batch_size = batch_size
    self._rows = sharding.batch_sharding(mesh, 2)
    self._per_row = sharding.batch_sharding(mesh, 1)
    self._decode = jax.jit(functools.partial(guided_decode, models, sampling=sampling,
                                             num_candidates=num_candidates))

  def generate(self, prompts: Sequence[Sequence[int]], requests: Sequence[LengthRequest],
               row_ids: Sequence[int] | None = None) -> list[GuidedSample]:
    """One guided sample per prompt, in input order; requests[i] is prompt i's length instruction."""
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if not len(row_ids) == len(requests) == len(prompts):
      raise ValueError(f"got {len(prompts)} prompts, {len(requests)} requests and {len(row_ids)} row_ids")
    out: list[GuidedSample | None] = [None] * len(prompts)
    filler = LengthRequest()
    for chunk, tokens, lengths in prompt_batches(prompts, self.batch_size, self.models.vocab_size):
      fill = self.batch_size - len(chunk)
      chunk_requests = [requests[i] for i in chunk] + [filler] * fill
      per_row = lambda values, dtype: jax.device_put(np.asarray(values, dtype), self._per_row)
      with jax.set_mesh(self.mesh):
        generated, values, counts, finished = jax.device_get(self._decode(
            self.params, jax.device_put(tokens, self._rows), per_row(lengths, np.int32),
            per_row([row_ids[i] for i in chunk] + [0] * fill, np.int32),
            per_row([RULES.index(r.rule) for r in chunk_requests], np.int32),
            per_row([r.target for r in chunk_requests], np.int32),
            per_row([r.beta for r in chunk_requests], np.float32),
            per_row([SELECTIONS.index(r.selection) for r in chunk_requests], np.int32),
            per_row([SPACES.index(r.space) for r in chunk_requests], np.int32),
            per_row([r.target_offset for r in chunk_requests], np.int32)))
      for row, i in enumerate(chunk):
        n = counts[row]
        out[i] = GuidedSample(generated[row, :n].copy(), values[row, :n].copy(), bool(finished[row]))
    return out
