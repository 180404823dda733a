"""The sampling flags every decoding CLI shares (evaluate, evaluate_budget, generate, bench_guided): one set of
defaults, and --settings for the paper's.

  --settings=paper_lifebench   temperature 1, top-k 15, top-p 0.999, min-p 0, the reference's filter, 15 candidates
                               (the paper's LIFEBench runs, Table 2);
  --settings=paper_tradeoff    temperature 1, top-k 5, top-p 1, min-p 0.01, the reference's filter, 5 candidates
                               (the paper's accuracy / length trade-off, Fig. 2 and 5);
  --settings=none              the flags' own defaults: temperature 1, no top-k / top-p / min-p, hf filter,
                               9 candidates.
A flag given on the command line wins over its --settings value. --unguided=full (the default) samples the unguided
baseline from the whole filtered distribution, as the paper's baseline; --unguided=candidates only among the guided
run's candidates. Each CLI calls `define()` once at import (bench_guided keeps its own list of candidate counts).

The guidance options (evaluate, evaluate_budget) pass the reference's per-request settings to every guided row:
--equal_to=soft (the reference's eq_soft for Equal To), --value_mode (the --betas sweep's mode: centered_exp is the
tilt; mul, linear, exp, length_mul, value_bias are the reference's expectation guidance with scale = beta),
--value_entropy_threshold, --value_min and --guidance_gamma (lenvm_jax/decoding/guided.py).
"""

import dataclasses

from absl import flags

from lenvm_jax.decoding.guided import CONVENTIONS, VALUE_MODES, LengthRequest
from lenvm_jax.decoding.sampler import FILTER_STYLES, SamplingConfig
from lenvm_jax.errors import UserError

SETTINGS = {
    "none": {},
    "paper_lifebench": dict(temperature=1.0, top_k=15, top_p=0.999, min_p=0.0, filter_style="reference",
                            candidates=15),
    "paper_tradeoff": dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.01, filter_style="reference", candidates=5),
}
DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, filter_style="hf", candidates=9)
UNGUIDED = ("full", "candidates")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The resolved flag values."""
  settings: str
  temperature: float
  top_k: int
  top_p: float
  min_p: float
  filter_style: str
  candidates: int
  unguided: str
  length_rules: str
  equal_to: str = "hard"
  value_mode: str = "centered_exp"
  value_entropy_threshold: float | None = None
  value_min: float | None = None
  guidance_gamma: float | None = None

  def config(self, max_new_tokens: int, eos_ids, seed: int) -> SamplingConfig:
    """A SamplingConfig with these filters; a bad value is the user's (names the flag)."""
    try:
      return SamplingConfig(max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), temperature=self.temperature,
                            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=seed,
                            filter_style=self.filter_style)
    except ValueError as e:  # "sampling top_p must lie in (0, 1] ..." -> the flag's name.
      name = next((f for f in ("temperature", "top_k", "top_p", "min_p") if f"sampling {f} " in str(e)), None)
      raise UserError(f"--{name}: {e}" if name else str(e)) from None

  def describe(self) -> dict:
    return dataclasses.asdict(self)

  def unguided_request(self) -> LengthRequest:
    """The unguided baseline's request for a guided sampler: no rule (the whole filtered distribution), or with
    --unguided=candidates the base distribution restricted to the k candidates (a tilt with beta 0)."""
    return LengthRequest("tilt", beta=0.0) if self.unguided == "candidates" else LengthRequest()

  def _options(self) -> dict:
    unset = lambda v: float("nan") if v is None else v
    return dict(value_entropy_threshold=unset(self.value_entropy_threshold), value_min=unset(self.value_min),
                gamma=unset(self.guidance_gamma))

  def request(self, rule: str, target: int, convention: str | None = None) -> LengthRequest:
    """A length instruction under the chosen rules (Equal To: eq_soft with --equal_to=soft) and options."""
    if rule == "equal_to" and self.equal_to == "soft":
      rule = "eq_soft"
    try:
      return LengthRequest.following(convention or self.length_rules, rule, target, **self._options())
    except ValueError as e:
      raise UserError(str(e)) from None

  def sweep_request(self, beta: float) -> LengthRequest:
    """One point of a length sweep: the tilt (centered_exp) with beta, or the reference's expectation guidance in
    --value_mode with scale = beta."""
    try:
      if self.value_mode == "centered_exp":
        return LengthRequest("tilt", beta=beta, **self._options())
      return LengthRequest("expectation", value_mode=self.value_mode, scale=beta, **self._options())
    except ValueError as e:
      raise UserError(str(e)) from None


_defined = {}
flags.disclaim_key_flags()  # The shared flags count as the calling tool's own: its --help lists them.


def define(candidates: bool = True, length_rules: bool = True, guidance: bool = True) -> None:
  """Defines the shared flags (once per process); `guidance` adds the reference's per-request options."""
  if _defined:
    return
  _defined["settings"] = flags.DEFINE_enum("settings", "none", list(SETTINGS),
                                           "Named sampling settings (experiments/sampling_flags.py); flags given on "
                                           "the command line win.")
  _defined["temperature"] = flags.DEFINE_float("temperature", DEFAULTS["temperature"], "Sampling temperature "
                                               "(> 0 for guided decoding; 0 = greedy for plain sampling).")
  _defined["top_k"] = flags.DEFINE_integer("top_k", DEFAULTS["top_k"], "Top-k filter (0 = off).")
  _defined["top_p"] = flags.DEFINE_float("top_p", DEFAULTS["top_p"], "Top-p filter (1 = off).")
  _defined["min_p"] = flags.DEFINE_float("min_p", DEFAULTS["min_p"], "Min-p filter (0 = off).")
  _defined["filter_style"] = flags.DEFINE_enum("filter_style", DEFAULTS["filter_style"], list(FILTER_STYLES),
                                               "Top-k / top-p semantics: hf (Hugging Face) or reference (the LenVM "
                                               "reference server); lenvm_jax/decoding/sampler.py.")
  if candidates:
    _defined["candidates"] = flags.DEFINE_integer("candidates", DEFAULTS["candidates"], "Candidates per guided step "
                                                  "(the most likely tokens surviving the filters).")
    _defined["unguided"] = flags.DEFINE_enum("unguided", "full", list(UNGUIDED), "The unguided baseline samples the "
                                             "whole filtered distribution (full, the paper's) or only the guided run's "
                                             "candidates.")
  if length_rules:
    _defined["length_rules"] = flags.DEFINE_enum("length_rules", "default", list(CONVENTIONS),
                                                 "How Equal To / At Most / At Least choose (docs/inference.md): "
                                                 "default (what a user asks), paper, reference, reference_lifebench, "
                                                 "sample_fitting.")
  if guidance:
    _defined["equal_to"] = flags.DEFINE_enum("equal_to", "hard", ["hard", "soft"], "Equal To: the hard rule of "
                                             "--length_rules, or the reference's soft eq_soft (a tilt to the target).")
    _defined["value_mode"] = flags.DEFINE_enum("value_mode", "centered_exp", list(VALUE_MODES), "Mode of the --betas "
                                               "sweep: centered_exp = the tilt p exp(beta u); the others are the "
                                               "reference's expectation guidance with scale = beta (mul: its default).")
    _defined["value_entropy_threshold"] = flags.DEFINE_float("value_entropy_threshold", None, "Rows whose candidate "
                                                             "distribution has at most this entropy (nats) sample "
                                                             "unguided.")
    _defined["value_min"] = flags.DEFINE_float("value_min", None, "Expectation guidance: rows whose mean u is below "
                                               "this sample unguided.")
    _defined["guidance_gamma"] = flags.DEFINE_float("guidance_gamma", None, "Gamma for guidance's length <-> value "
                                                    "conversions (default: the LenVM's own).")


def resolve() -> Sampling:
  """The flag values after --settings (a flag set on the command line wins)."""
  settings = _defined["settings"].value
  chosen = SETTINGS[settings]
  value = lambda name: (_defined[name].value if name in _defined and (flags.FLAGS[name].present or name not in chosen)
                        else chosen.get(name, DEFAULTS.get(name)))
  sampling = Sampling(settings=settings, temperature=value("temperature"), top_k=value("top_k"),
                      top_p=value("top_p"), min_p=value("min_p"), filter_style=value("filter_style"),
                      candidates=value("candidates"),
                      unguided=_defined["unguided"].value if "unguided" in _defined else "candidates",
                      length_rules=_defined["length_rules"].value if "length_rules" in _defined else "default",
                      **{name: _defined[name].value for name in ("equal_to", "value_mode", "value_entropy_threshold",
                                                                 "value_min", "guidance_gamma") if name in _defined})
  if "candidates" in _defined and sampling.candidates < 1:
    raise UserError(f"--candidates must be >= 1, got {sampling.candidates}")
  return sampling
