"""Length-guided decoding (docs/method.md §9): a generator proposes, a LenVM scores, a per-row rule chooses.

Each step, per row: the generator's logits go through the sampling filters (temperature, top-k, top-p, min-p;
lenvm_jax/decoding/sampler.py), the `num_candidates` most likely surviving tokens are the candidates, and the LenVM
scores every candidate x by its value head's logit z(s_t + x). Guidance keeps z: V = -sigmoid(z), u = -V = sigmoid(z)
(the reference's sign: larger = longer) and the expected remainder n = log(1 + V) / log(gamma) =
log_sigmoid(-z) / log(gamma), exact in float32 far past where V rounds to -1 (value/targets.py). An EOS candidate has
V = 0, n = 0. All candidates of all rows are scored in one batched forward over the LenVM's prefix cache
(lenvm_jax/decoding/guided_models.py).

Targets (per row; lengths count the EOS token): with target_mode "total", R = max(target - generated -
target_offset, 0) tokens are still wanted after the candidate (offset 1: the candidate is one of the target's tokens;
0: the reference's R = max(T - generated, 0); -1: the reference's LIFEBench client, which asks for T + 1); with
"remaining", R = max(target - target_offset, 0), fixed while decoding. u* = 1 - gamma ** R is its value (or
`target_value` when set, the reference's direct target in u). The budget is met when u* = 0 (R = 0).

Rules:
  none        sample from the base distribution over the candidates;
  equal_to    the candidate closest to the target: in length space |n - R| (space "length") or value space |u - u*|
              ("value", the paper's); ties: the more likely. Under selection "default" EOS is not taken while R > 0
              (unless it is the only candidate): ending early is a certain miss, while any other token keeps the
              chance to end exactly on target, so the answer ends on its target whenever EOS is offered there;
  at_most     "default": until the budget is met, EOS keeps its base probability (the model ends when it would;
              not as the first token, an empty answer) and the candidates whose expected remainder fits (n <= R)
              share the rest in their base proportions; when none fits, the shortest other candidate takes it; at
              the budget, EOS if offered, else the shortest: the answer the model would give, ended by the model or
              at the budget, never cut by choice.
              "sample_fitting": a base sample among the fitting candidates, EOS included (it gains the mass of those
              that do not fit), else the shortest. "paper" / "reference": the shortest (largest V), always;
  at_least    "default": a base sample among the non-EOS candidates until the budget is met, then EOS if offered,
              else the shortest. "paper": the longest, always. "reference": the longest until the budget is met, then
              the shortest. "sample_fitting": until the budget is met, a base sample among candidates expected to
              reach it (n >= R), else the longest; then the shortest;
  tilt        sample from p'(x) ~ p(x) exp(beta * u(x)): beta < 0 shorter, beta > 0 longer (= the reference's
              value mode centered_exp with scale beta);
  eq_soft     the reference's soft Equal To: if u* lies outside the candidates' [min u, max u], the shortest or
              longest; else sample from the exponential tilt p(x) exp(lam * u(x)) whose mean u is u*;
  expectation the reference's expectation guidance (value_mode, scale): a target mean u from the base mean E_p[u]
              (mul: scale * E; linear: toward max (scale >= 1) or min u; exp: 1 - (1 - E') ** scale on the
              normalised range; length_mul: the length of E scaled by `scale`), then sample from the tilt that has
              that mean; centered_exp (p exp(scale u)) and value_bias (p exp(scale z)) tilt directly. With
              value_min, a row whose E_p[u] is below it samples unguided.
value_entropy_threshold (nats): a row whose candidate distribution has at most that entropy samples unguided (the
reference skips the LenVM there). gamma (per request) replaces the LenVM's gamma in every length <-> value
conversion, as the reference does (its Qwen3 LIFEBench runs decode at 0.9998 with a LenVM trained at 0.999).
Deterministic choices break ties toward the more likely candidate (candidates come sorted by probability), as the
reference does. `LengthRequest.following(convention, ...)` sets selection, space and target_offset together:
"default", "paper", "reference", "reference_lifebench" or "sample_fitting" (CONVENTIONS).
"""

import dataclasses
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lenvm_jax.value.targets import log1p_value_from_logit

RULES = ("none", "equal_to", "at_most", "at_least", "tilt", "eq_soft", "expectation")
_NONE, _EQUAL_TO, _AT_MOST, _AT_LEAST, _TILT, _EQ_SOFT, _EXPECTATION = range(len(RULES))
SELECTIONS = ("default", "paper", "reference", "sample_fitting")  # How the hard rules pick among the candidates.
_DEFAULT, _PAPER, _REFERENCE, _SAMPLE_FITTING = range(len(SELECTIONS))
SPACES = ("value", "length")  # Where equal_to measures the distance to the target.
TARGET_MODES = ("total", "remaining")  # target counts the whole answer, or the tokens still wanted (fixed).
VALUE_MODES = ("mul", "linear", "exp", "length_mul", "centered_exp", "value_bias")  # The reference's expectation modes.
_MUL, _LINEAR, _EXP, _LENGTH_MUL, _CENTERED_EXP, _VALUE_BIAS = range(len(VALUE_MODES))
# Named sets of (selection, space, target_offset): rules that do what a user asks (the default), the paper's literal
# rules, the reference code's, the reference's LIFEBench client (it asks for T + 1 tokens), and this framework's
# earlier sampling rules.
CONVENTIONS = {
    "default": dict(selection="default", space="length", target_offset=1),
    "paper": dict(selection="paper", space="value", target_offset=1),
    "reference": dict(selection="reference", space="length", target_offset=0),
    "reference_lifebench": dict(selection="reference", space="length", target_offset=-1),
    "sample_fitting": dict(selection="sample_fitting", space="value", target_offset=1),
}
_UNSET = float("nan")


@dataclasses.dataclass(frozen=True)
class LengthRequest:
  """One row's length instruction: a rule, its target length in tokens (EOS included), beta for `tilt`, and how the
  rule is applied (module docstring). The defaults are the "default" convention's rules; the reference's options
  (target_mode, value_mode, scale, value_min, value_entropy_threshold, target_value, gamma) are off or at the
  reference's defaults. NaN = unset for the optional floats."""
  rule: str = "none"
  target: int = 0
  beta: float = 0.0
  selection: str = "default"
  space: str = "length"
  target_offset: int = 1
  target_mode: str = "total"
  value_mode: str = "mul"
  scale: float = 1.0
  value_min: float = _UNSET
  value_entropy_threshold: float = _UNSET
  target_value: float = _UNSET
  gamma: float = _UNSET

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"length rule must be one of {RULES}, got {self.rule!r}")
    has_target_value = np.isfinite(self.target_value)
    if self.rule in ("equal_to", "at_most", "at_least", "eq_soft") and self.target <= 0 and not has_target_value:
      raise ValueError(f"length rule {self.rule!r} needs a positive target, got {self.target}")
    if has_target_value and not 0.0 <= self.target_value < 1.0:
      raise ValueError(f"target_value is the reference's u = 1 - gamma ** n in [0, 1), got {self.target_value}")
    if not np.isfinite(self.beta):
      raise ValueError(f"tilt beta must be finite, got {self.beta}")
    if not np.isfinite(self.scale):
      raise ValueError(f"value scale must be finite, got {self.scale}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"length selection must be one of {SELECTIONS}, got {self.selection!r}")
    if self.space not in SPACES:
      raise ValueError(f"equal_to space must be one of {SPACES}, got {self.space!r}")
    if self.target_offset not in (-1, 0, 1):
      raise ValueError(f"target_offset must be 1 (the target counts the candidate), 0 (the reference's) or -1 (the "
                       f"reference's LIFEBench client: T + 1), got {self.target_offset!r}")
    if self.target_mode not in TARGET_MODES:
      raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {self.target_mode!r}")
    if self.value_mode not in VALUE_MODES:
      raise ValueError(f"value_mode must be one of {VALUE_MODES}, got {self.value_mode!r}")
    if np.isfinite(self.gamma) and not 0.0 < self.gamma < 1.0:
      raise ValueError(f"gamma must lie in (0, 1), got {self.gamma}")

  @classmethod
  def following(cls, convention: str, rule: str = "none", target: int = 0, beta: float = 0.0,
                **fields) -> "LengthRequest":
    """A request under a named set of rules (CONVENTIONS); `fields` set the reference's options."""
    if convention not in CONVENTIONS:
      raise ValueError(f"length rule convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    return cls(rule, target, beta, **{**CONVENTIONS[convention], **fields})


def request_arrays(requests: Sequence[LengthRequest]) -> dict:
  """The per-row arrays `choose` reads ({field: [B] numpy array}), from one request per row."""
  column = lambda get, dtype: np.asarray([get(r) for r in requests], dtype)
  return {
      "rule": column(lambda r: RULES.index(r.rule), np.int32),
      "target": column(lambda r: r.target, np.int32),
      "beta": column(lambda r: r.beta, np.float32),
      "selection": column(lambda r: SELECTIONS.index(r.selection), np.int32),
      "space": column(lambda r: SPACES.index(r.space), np.int32),
      "target_offset": column(lambda r: r.target_offset, np.int32),
      "target_mode": column(lambda r: TARGET_MODES.index(r.target_mode), np.int32),
      "value_mode": column(lambda r: VALUE_MODES.index(r.value_mode), np.int32),
      "scale": column(lambda r: r.scale, np.float32),
      "value_min": column(lambda r: r.value_min, np.float32),
      "entropy_threshold": column(lambda r: r.value_entropy_threshold, np.float32),
      "target_value": column(lambda r: r.target_value, np.float32),
      "gamma": column(lambda r: r.gamma, np.float32),
  }


class GuidedModels(Protocol):
  """A generator and a LenVM decoding together (two models, or one shared trunk); pure functions of params."""
  vocab_size: int
  gamma: float

  def start(self, params, prompt_tokens, prompt_lengths, cache_len):
    """Prefill of left-padded prompts [B, P]: (state, next-token logits [B, V])."""

  def score(self, params, state, candidates, positions):
    """The value head's logit z(s_t + x) [B, k] of candidates [B, k] at positions [B] in the discounted convention
    (V = -sigmoid(z); TargetKind.discounted_logit), without committing: (logits, pending)."""

  def commit(self, params, state, pending, choice, tokens, positions):
    """Appends the chosen candidates (index choice [B], ids tokens [B]): (state, next-token logits [B, V])."""


_TILT_DOUBLINGS, _TILT_STEPS = 17, 40  # Bracket up to |lam| = 2 ** 17 (the reference stops near 1e5); Newton steps.


def _tilt_to_mean(log_p, d, allowed, target):
  """lam [B] such that the tilt p(x) exp(lam d(x)) has mean d equal to target [B] (strictly inside each row's range
  of d >= 0): the bracket is doubled outward from [-1, 1], then Newton steps kept inside it, else bisection. d is
  u - min u, so it keeps float32's precision where u itself is close to 1."""

  def mean_var(lam):
    w = jax.nn.softmax(jnp.where(allowed, log_p + lam[:, None] * d, -jnp.inf), axis=-1)
    mean = jnp.sum(w * d, axis=-1)
    return mean, jnp.sum(w * (d - mean[:, None])**2, axis=-1)

  def widen(_, bounds):
    lo, hi = bounds
    return jnp.where(mean_var(lo)[0] > target, 2.0 * lo, lo), jnp.where(mean_var(hi)[0] < target, 2.0 * hi, hi)

  ones = jnp.ones_like(target)
  lo, hi = jax.lax.fori_loop(0, _TILT_DOUBLINGS, widen, (-ones, ones))

  def newton(_, carry):
    lam, lo, hi = carry
    mean, var = mean_var(lam)
    lo, hi = jnp.where(mean < target, lam, lo), jnp.where(mean < target, hi, lam)
    step = lam - (mean - target) / jnp.maximum(var, 1e-30)
    ok = (var > 1e-30) & (step > lo) & (step < hi)
    return jnp.where(ok, step, 0.5 * (lo + hi)), lo, hi

  return jax.lax.fori_loop(0, _TILT_STEPS, newton, (jnp.zeros_like(target), lo, hi))[0]


def guided_logits(candidate_logits, logits, is_eos, generated, rows: dict, gamma: float):
  """The distribution each row's rule draws its next token from, as logits [B, k] (-inf = never; a deterministic
  rule is one-hot: 0 at its choice). See the module docstring for the rules.

  candidate_logits [B, k]: the filtered sampling logits (-inf = not allowed, at least one allowed per row, sorted by
  probability); logits [B, k]: the value head's z of each candidate (discounted convention); is_eos [B, k];
  generated [B] tokens so far; rows: the per-row request arrays of `request_arrays` ([B] each); gamma: the LenVM's
  (a row's own `gamma` replaces it).
  """
  allowed = jnp.isfinite(candidate_logits)
  log_g = jnp.log(jnp.where(jnp.isnan(rows["gamma"]), jnp.float32(gamma), rows["gamma"]))[:, None]  # [B, 1]
  log_w = jnp.where(is_eos, 0.0, log1p_value_from_logit(logits))  # log(1 + V) = log(1 - u) <= 0, exact.
  w = jnp.exp(log_w)  # 1 - u = gamma ** n; EOS: 1. Exact where u is near 1.
  u = jnp.where(is_eos, 0.0, jax.nn.sigmoid(logits))  # Exact where u is near 0.
  order = jnp.where(is_eos, -1e30, logits)  # u's order, exact at both ends (sigmoid is monotone); EOS first.
  n = log_w / log_g  # Expected remainder after the candidate; EOS: 0.
  # The target: R tokens still wanted, or the reference's target_value u*; as log w* = log(1 - u*).
  total = rows["target_mode"] == TARGET_MODES.index("total")
  remaining = jnp.maximum(rows["target"] - jnp.where(total, generated, 0) - rows["target_offset"], 0)
  has_target_value = ~jnp.isnan(rows["target_value"])
  log_w_star = jnp.where(has_target_value[:, None], jnp.log1p(-jnp.nan_to_num(rows["target_value"]))[:, None],
                         remaining[:, None].astype(jnp.float32) * log_g)  # [B, 1]
  n_star = log_w_star / log_g
  w_star = jnp.exp(log_w_star)[:, 0]
  u_star = -jnp.expm1(log_w_star[:, 0])
  near_zero = u_star < 0.5  # Compare in u there (exact near 0), else in w = 1 - u (exact near 1).
  budget_met = u_star <= 1e-12  # u* = 0: R = 0 (the reference's |v_tgt| <= 1e-12).

  masked = lambda scores, ok=allowed: jnp.where(ok, scores, -jnp.inf)
  base = masked(candidate_logits)
  one_hot = lambda index: jnp.where(jnp.arange(w.shape[-1])[None] == index[:, None], 0.0, -jnp.inf)
  first_min = lambda cost, ok=allowed: jnp.argmin(jnp.where(ok, cost, jnp.inf), axis=-1)
  shortest, longest = first_min(order), first_min(-order)  # Largest / smallest V; ties: the more likely.
  per_row = lambda condition: condition[:, None]

  def sample_within(ok, fallback):
    """The base distribution among the allowed candidates with `ok`; none: the one-hot `fallback` [B, k]."""
    ok = ok & allowed
    return jnp.where(per_row(jnp.any(ok, axis=-1)), masked(candidate_logits, ok), fallback)

  selection = rows["selection"]
  default = selection == _DEFAULT
  other_than_eos = jnp.any(allowed & ~is_eos, axis=-1)
  # Equal To.
  value_cost = jnp.where(per_row(near_zero), jnp.abs(u - u_star[:, None]), jnp.abs(w - w_star[:, None]))
  cost = jnp.where(per_row(rows["space"] == SPACES.index("length")), jnp.abs(n - n_star), value_cost)
  early_eos = per_row(default & ~budget_met & other_than_eos) & is_eos
  equal_to = one_hot(first_min(jnp.where(early_eos, jnp.inf, cost)))
  # At Most / At Least.
  fits = n <= n_star
  # Default: until the budget, EOS keeps its base probability (the model ends when it would) and the other
  # candidates' mass goes to those expected to fit, in proportion, or, when none is, to the shortest of them; at the
  # budget, EOS if offered, else the shortest.
  log_p = jax.nn.log_softmax(base, axis=-1)
  p = jnp.exp(log_p)
  eos_offered = jnp.any(allowed & is_eos, axis=-1)
  others = allowed & ~is_eos
  # EOS as the very first token is an empty answer, never what "at most N tokens" asks for: its mass goes to the rest.
  first_token = per_row(generated == 0)
  p_eos = jnp.sum(jnp.where(allowed & is_eos & ~first_token, p, 0.0), axis=-1)
  fitting_others = others & fits
  p_fit = jnp.sum(jnp.where(fitting_others, p, 0.0), axis=-1)
  shortest_other = one_hot(first_min(order, others)) == 0.0
  receivers = jnp.where(per_row(p_fit > 0), fitting_others, shortest_other)
  log_share = jnp.where(per_row(p_fit > 0), log_p - per_row(jnp.log(jnp.maximum(p_fit, 1e-38))), 0.0)
  before_budget = jnp.where(receivers, log_share + per_row(jnp.log1p(-p_eos)),
                            jnp.where(allowed & is_eos & ~first_token, log_p, -jnp.inf))
  at_budget = jnp.where(per_row(eos_offered), one_hot(first_min(order, allowed & is_eos)), one_hot(shortest))
  default_at_most = jnp.where(per_row(budget_met | ~jnp.any(others, axis=-1)), at_budget, before_budget)
  at_most = jnp.select([per_row(default), per_row(selection == _SAMPLE_FITTING)],
                       [default_at_most, sample_within(fits, one_hot(shortest))], one_hot(shortest))
  default_at_least = jnp.where(per_row(budget_met),
                               jnp.where(per_row(eos_offered), one_hot(first_min(order, allowed & is_eos)),
                                         one_hot(shortest)),
                               sample_within(~is_eos, base))
  at_least = jnp.select(
      [per_row(default), per_row(selection == _PAPER), per_row(budget_met), per_row(selection == _REFERENCE)],
      [default_at_least, one_hot(longest), one_hot(shortest), one_hot(longest)],
      sample_within(n >= n_star, one_hot(longest)))
  # Soft rules, in d = u - min u >= 0: from u where the smallest u is below 1/2, else as max w - w (each exact there).
  w_max, w_min = jnp.max(masked(w), axis=-1), -jnp.max(masked(-w), axis=-1)
  min_u, max_u = -jnp.max(masked(-u), axis=-1), jnp.max(masked(u), axis=-1)
  low = min_u < 0.5
  d = jnp.where(allowed, jnp.where(per_row(low), u - min_u[:, None], w_max[:, None] - w), 0.0)
  span = jnp.where(low, max_u - min_u, w_max - w_min)  # max u - min u.
  mean_u, mean_w = jnp.sum(p * u, axis=-1), jnp.sum(p * w, axis=-1)
  mean_d = jnp.sum(p * d, axis=-1)  # E_p[u] - min u.
  eps = jnp.maximum(1e-12, span * 1e-6)
  tilt = masked(candidate_logits + rows["beta"][:, None] * u)
  # Expectation guidance: a target mean u from E_p[u], then the tilt that has it.
  rule, scale, mode = rows["rule"], rows["scale"], rows["value_mode"]
  # length_mul: the length of E_p[u] (clipped to [1e-15, 1 - 1e-15] as the reference does), times scale, as a value.
  log_mean_w = jnp.clip(jnp.where(mean_u < 0.5, jnp.log1p(-mean_u), jnp.log(jnp.maximum(mean_w, 1e-38))),
                        np.log(1e-15), -1e-15)
  length_mul = jnp.where(low, -jnp.expm1(scale * log_mean_w) - min_u, w_max - jnp.exp(scale * log_mean_w))
  fraction = jnp.clip(mean_d / jnp.maximum(span, 1e-30), 0.0, 1.0)
  exp_target = jnp.where(span < 1e-8, mean_d, (1.0 - (1.0 - fraction)**jnp.maximum(scale, 0.0)) * span)
  linear = jnp.where(scale >= 1.0, mean_d + (scale - 1.0) * (span - mean_d), mean_d - (1.0 - scale) * mean_d)
  mul = (scale - 1.0) * min_u + scale * mean_d  # scale * E_p[u] - min u, exact at scale 1 even where u is near 1.
  target_d = jnp.clip(jnp.select([mode == _LENGTH_MUL, mode == _LINEAR, mode == _EXP], [length_mul, linear, exp_target],
                                 mul), 0.0, span)
  unguided = (span < 1e-8) | (jnp.abs(target_d - mean_d) < 1e-8) | ((mode == _MUL) & (scale <= 0.0))
  unguided |= mean_u < jnp.nan_to_num(rows["value_min"], nan=-jnp.inf)  # value_min: E_p[u] below it.
  # One solve for the rows whose rule tilts to a mean (eq_soft: u*; expectation: its target), skipped at run time
  # when no row of the batch needs it (decoding with the hard rules pays nothing for it).
  u_star_d = jnp.where(low, u_star - min_u, w_max - w_star)  # u* - min u.
  tilt_target = jnp.clip(jnp.where(rule == _EQ_SOFT, u_star_d, target_d), eps, span - eps)
  needs_solve = ((rule == _EQ_SOFT) | ((rule == _EXPECTATION) & (mode != _CENTERED_EXP) & (mode != _VALUE_BIAS))
                 ) & (span > 0)
  lam = jax.lax.cond(jnp.any(needs_solve), lambda: _tilt_to_mean(log_p, d, allowed, tilt_target),
                     lambda: jnp.zeros_like(tilt_target))
  tilted = masked(log_p + lam[:, None] * d)
  # eq_soft: outside the candidates' range, the boundary candidate; inside, the tilt with mean u*.
  below = jnp.where(near_zero, u_star <= min_u, w_star >= w_max)
  above = jnp.where(near_zero, u_star >= max_u, w_star <= w_min)
  eq_soft = jnp.where(per_row(below), one_hot(shortest), jnp.where(per_row(above), one_hot(longest), tilted))
  expectation = jnp.select(
      [per_row(mode == _CENTERED_EXP), per_row(mode == _VALUE_BIAS), per_row(unguided)],
      [masked(log_p + scale[:, None] * u), masked(log_p + scale[:, None] * logits), base], tilted)
  out = jnp.select([per_row(rule == r) for r in (_EQUAL_TO, _AT_MOST, _AT_LEAST, _TILT, _EQ_SOFT, _EXPECTATION)],
                   [equal_to, at_most, at_least, tilt, eq_soft, expectation], base)
  # value_entropy_threshold: a confident row samples unguided (the reference does not ask the LenVM there).
  entropy = -jnp.sum(p * jnp.log(p + 1e-20), axis=-1)
  confident = entropy <= jnp.nan_to_num(rows["entropy_threshold"], nan=-jnp.inf)
  return jnp.where(per_row(confident), base, out)


def choose(candidate_logits, logits, is_eos, generated, keys, rows: dict, gamma: float):
  """Index [B] of the chosen candidate per row: a draw from `guided_logits` (keys: [B] PRNG keys), so a
  deterministic rule's choice is its one-hot entry."""
  scores = guided_logits(candidate_logits, logits, is_eos, generated, rows, gamma)
  gumbel = jax.vmap(lambda key: jax.random.gumbel(key, scores.shape[-1:]))(keys)
  return jnp.argmax(scores + gumbel, axis=-1).astype(jnp.int32)
