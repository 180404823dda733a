"""Batch generation for the tools (rollouts, evaluation, benchmarks): many prompts in, one sample each out, in
input order, through the decode engine (lenvm_jax/decoding/engine.py), which refills a slot as soon as its row ends.

`Sampler` generates with a policy's LM head; `GuidedSampler` steers a generator with a LenVM, one LengthRequest per
prompt. Both take one SamplingConfig for every row and a row id per prompt (its random stream: the engine's
sample_id), so a sample does not depend on the batch, the slot count or the other prompts.
"""

import dataclasses
from typing import Callable, Sequence

import numpy as np

from lenvm_jax.decoding import sampler
from lenvm_jax.decoding.engine import Engine, Request
from lenvm_jax.decoding.eos import check_in_vocabulary
from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.decoding.guided_models import Pair, TransformerGenerator, check_same_vocabulary
from lenvm_jax.value.targets import remaining_from_logit


@dataclasses.dataclass(frozen=True)
class Sample:
  completion_ids: np.ndarray  # Generated tokens, ending with an EOS id when finished.
  finished: bool  # An EOS id was generated (else the row was cut at max_new_tokens).


@dataclasses.dataclass(frozen=True)
class GuidedSample:
  completion_ids: np.ndarray  # Generated tokens, ending with an EOS id when finished.
  values: np.ndarray  # V after each generated token (the LenVM's view of the remaining length along the way).
  finished: bool
  logits: np.ndarray | None = None  # The LenVM's z after each token (-inf at EOS): exact lengths where V rounds to -1.

  def remaining(self, gamma: float) -> np.ndarray:
    """The LenVM's expected remainder after each generated token, from z (exact past float32's V)."""
    source = self.logits if self.logits is not None else np.log(-np.minimum(self.values, -1e-38)) - np.log1p(
        self.values)
    return np.asarray(remaining_from_logit(source, gamma))


class _EngineCache:
  """One engine per bucketed prompt width (the cache length is part of the compiled program), built on demand."""

  def __init__(self, build):
    self._build, self._engines = build, {}

  def for_prompts(self, prompts) -> Engine:
    width = sampler.bucket_width(max(map(len, prompts)), 16)
    fitting = [w for w in self._engines if w >= width]
    if fitting:
      return self._engines[min(fitting)]
    return self._engines.setdefault(width, self._build(width))


def _requests(prompts, row_ids, sampling: sampler.SamplingConfig, lengths=None) -> list[Request]:
  row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
  if len(row_ids) != len(prompts):
    raise ValueError(f"got {len(row_ids)} row_ids for {len(prompts)} prompts")
  lengths = lengths or [None] * len(prompts)
  return [Request(tuple(int(t) for t in p), sampling.max_new_tokens, sampling.temperature, sampling.top_k,
                  sampling.top_p, sampling.min_p, sampling.seed, int(i), length)
          for p, i, length in zip(prompts, row_ids, lengths)]


class Sampler:
  """Generates completions for many prompts with `batch_size` engine slots on a mesh (batch over data x fsdp)."""

  def __init__(self, graphdef, params, sampling: sampler.SamplingConfig, mesh, batch_size: int = 16):
    sampler.check_batch_size(mesh, batch_size)
    self.graphdef, self.params, self.sampling, self.mesh = graphdef, params, sampling, mesh
    self.batch_size = batch_size
    self.vocab_size = params["embedding"].shape[0]
    check_in_vocabulary(sampling.eos_ids, self.vocab_size, "sampling eos_ids")
    self._engines = _EngineCache(lambda width: Engine(
        TransformerGenerator(graphdef, self.vocab_size), params, mesh, eos_ids=sampling.eos_ids, slots=batch_size,
        max_prompt_len=width, max_new_tokens=sampling.max_new_tokens, filter_style=sampling.filter_style))

  def generate(self, prompts: Sequence[Sequence[int]], row_ids: Sequence[int] | None = None,
               on_sample: Callable[[Sample], None] | None = None) -> list[Sample]:
    """One sample per prompt, in input order. row_ids (default 0..n-1) pick each row's random stream;
    on_sample(sample) hears each sample as it ends (progress)."""
    sampler.check_prompts(prompts, self.vocab_size)
    requests = _requests(prompts, row_ids, self.sampling)
    if not prompts:
      return []
    as_sample = lambda c: Sample(c.tokens, c.finish_reason == "stop")
    completions = self._engines.for_prompts(prompts).generate(
        requests, on_completion=(lambda c: on_sample(as_sample(c))) if on_sample else None)
    return [as_sample(c) for c in completions]


class GuidedSampler:
  """Guided generation for many prompts with `batch_size` engine slots on a mesh (batch over data x fsdp)."""

  def __init__(self, models, params, sampling: sampler.SamplingConfig, mesh, num_candidates: int = 5,
               batch_size: int = 16):
    sampler.check_batch_size(mesh, batch_size)
    if sampling.temperature == 0.0:
      raise ValueError("guided decoding samples among candidates: sampling temperature must be > 0")
    if not 1 <= num_candidates <= models.vocab_size:
      raise ValueError(f"num_candidates must lie in [1, {models.vocab_size}], got {num_candidates}")
    check_in_vocabulary(sampling.eos_ids, models.vocab_size, "sampling eos_ids", "the generator")
    lenvm = params[1] if isinstance(models, Pair) and isinstance(params, tuple) else None
    if isinstance(lenvm, dict) and "embedding" in lenvm:
      check_same_vocabulary(models.vocab_size, lenvm["embedding"].shape[0], "the generator", "the LenVM's params")
    self.models, self.params, self.sampling, self.mesh = models, params, sampling, mesh
    self.batch_size, self.num_candidates = batch_size, num_candidates
    self._engines = _EngineCache(self.engine)

  def engine(self, max_prompt_len: int) -> Engine:
    """An engine for prompts up to max_prompt_len tokens with this sampler's models, candidates and slots."""
    return Engine(self.models, self.params, self.mesh, eos_ids=self.sampling.eos_ids, slots=self.batch_size,
                  max_prompt_len=max_prompt_len, max_new_tokens=self.sampling.max_new_tokens,
                  num_candidates=self.num_candidates, filter_style=self.sampling.filter_style)

  def lower(self, prompt_width: int):
    """The engine's decode program for prompts of prompt_width tokens, lowered without running it (self.params may
    be ShapeDtypeStructs): experiments/compile_check.py compiles it for a TPU topology (--steps=decode)."""
    return self.engine(prompt_width).lower()

  def generate(self, prompts: Sequence[Sequence[int]], requests: Sequence[LengthRequest],
               row_ids: Sequence[int] | None = None) -> list[GuidedSample]:
    """One guided sample per prompt, in input order; requests[i] is prompt i's length instruction."""
    if len(requests) != len(prompts):
      raise ValueError(f"got {len(prompts)} prompts and {len(requests)} requests")
    sampler.check_prompts(prompts, self.models.vocab_size)
    engine_requests = _requests(prompts, row_ids, self.sampling, list(requests))
    if not prompts:
      return []
    out = []  # engine.generate refuses a length the decode cannot reach (it would be cut, and scored), by index.
    for c in self._engines.for_prompts(prompts).generate(engine_requests):
      values = -0.5 * (1.0 + np.tanh(0.5 * c.logits.astype(np.float64)))  # V = -sigmoid(z); EOS: 0.
      out.append(GuidedSample(c.tokens, values.astype(np.float32), c.finish_reason == "stop", c.logits))
    return out
