"""Batched autoregressive sampling with a KV cache, under one jit: prefill, then fixed-shape decode steps.

Prompts of different lengths share a batch: they are left-padded to a common width (a power of two, so a few
shapes cover all batches), keep their own RoPE positions, and never attend to padding (lenvm_jax/model/kv_cache.py).
Decoding runs in a `lax.while_loop` that stops at `max_new_tokens` or when every row has emitted an EOS id; a row
that has finished emits padding (0) from then on.

Sampling filters are small pure functions applied in the order temperature -> top-k -> top-p -> min-p (the order
of Hugging Face `generate`); temperature 0 is greedy (argmax of the raw logits, first index on ties). Two semantics
(SamplingConfig.filter_style): "hf" (default) keeps top-k ties and measures top-p on the distribution renormalised
after top-k, keeping a token while the mass before it is below p; "reference" (the LenVM reference server) keeps
exactly k tokens and measures top-p on the un-renormalised top-k probabilities, keeping a token while the mass
before it is at most p. They differ at settings like LIFEBench's top_k 15, top_p 0.999, where the renormalised
tail is cut and the raw one is not.
Randomness is per row: row i's key is fold_in(key(seed), row_id[i]) and step t uses fold_in(row key, t), so a
sample does not depend on which other rows share its batch or on the batch size.

Batching (prompt_batches, bucket_width, left_pad) and the prefill are shared with guided decoding
(lenvm_jax/decoding/guided.py) and, for the bucketed width, the Predictor.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.decoding.eos import check_in_vocabulary
from lenvm_jax.model.kv_cache import KVCache

PAD_ID = 0
FILTER_STYLES = ("hf", "reference")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  temperature: float = 1.0  # 0 = greedy.
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  min_p: float = 0.0  # 0 = off.
  seed: int = 0
  filter_style: str = "hf"  # hf | reference: top-k / top-p semantics (module docstring).

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    checks = {
        "max_new_tokens": (self.max_new_tokens > 0, "must be positive"),
        "eos_ids": (bool(self.eos_ids) and min(self.eos_ids) >= 0, "must be one or more non-negative token ids"),
        "temperature": (self.temperature >= 0.0, "must be >= 0 (0 = greedy)"),
        "top_k": (self.top_k >= 0, "must be >= 0 (0 = off)"),
        "top_p": (0.0 < self.top_p <= 1.0, "must lie in (0, 1] (1 = off)"),
        "min_p": (0.0 <= self.min_p < 1.0, "must lie in [0, 1) (0 = off)"),
        "filter_style": (self.filter_style in FILTER_STYLES, f"must be one of {FILTER_STYLES}"),
    }
    for name, (ok, problem) in checks.items():
      if not ok:
        raise ValueError(f"sampling {name} {problem}, got {getattr(self, name)!r}")

  def to_dict(self) -> dict:
    """As recorded in generation.json; the default filter style is left out, so settings recorded before the field
    existed still match (rollouts refuse to resume under other settings)."""
    out = {**dataclasses.asdict(self), "eos_ids": list(self.eos_ids)}
    if self.filter_style == "hf":
      del out["filter_style"]
    return out


def scale_by_temperature(logits, temperature: float):
  return logits / temperature


def top_k_filter(logits, k: int):
  """Keeps the k largest logits (and any tied with the k-th); the rest become -inf. k = 0 keeps all."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches p (at least one token)."""
  if p >= 1.0:
    return logits
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # Probability of all more likely tokens.
  kept = mass_before < p
  threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(probs < threshold, -jnp.inf, logits)


def min_p_filter(logits, min_p: float):
  """Keeps tokens whose probability is at least min_p times the most likely token's."""
  if min_p <= 0.0:
    return logits
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)


def reference_filter(logits, top_k: int, top_p: float, min_p: float):
  """The reference server's candidate set: probabilities sorted, the first top_k kept (exactly k, no ties), then
  top-p on those un-renormalised probabilities keeping a token while the mass before it is <= top_p, then min-p
  against the most likely token. The most likely token is always kept. Kept logits are unchanged."""
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs, order = jax.lax.top_k(probs, probs.shape[-1])
  rank = jnp.arange(probs.shape[-1])
  kept = sorted_probs * (rank < top_k) if 0 < top_k < probs.shape[-1] else sorted_probs
  if top_p < 1.0:
    kept = jnp.where(jnp.cumsum(kept, axis=-1) - kept <= top_p, kept, 0.0)
  if min_p > 0.0:
    kept = jnp.where(kept >= min_p * kept[..., :1], kept, 0.0)
  keep = (kept > 0) | (rank == 0)
  keep = jnp.put_along_axis(jnp.zeros(probs.shape, bool), order, keep, axis=-1, inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def filter_logits(logits, sampling: SamplingConfig):
  """Temperature, then top-k, top-p and min-p: the logits the next token is drawn from (-inf = excluded)."""
  logits = scale_by_temperature(logits.astype(jnp.float32), sampling.temperature)
  if sampling.filter_style == "reference":
    return reference_filter(logits, sampling.top_k, sampling.top_p, sampling.min_p)
  logits = top_k_filter(logits, sampling.top_k)
  logits = top_p_filter(logits, sampling.top_p)
  return min_p_filter(logits, sampling.min_p)


def next_tokens(logits, keys, sampling: SamplingConfig):
  """[B] next tokens from [B, V] logits, one PRNG key per row."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, sampling)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def bucket_width(longest: int, smallest: int) -> int:
  """The power of two >= longest (at least `smallest`, a power of two): few distinct shapes, so few compiles."""
  return max(smallest, 1 << (max(longest, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, width] int32 prompts aligned to end at the last column, and their lengths."""
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def prompt_batches(prompts: Sequence[Sequence[int]], batch_size: int, vocab_size: int):
  """Checks the prompts, then yields (indices, tokens [batch_size, width], lengths [batch_size]) per batch: similar
  lengths share a batch, left-padded to a bucketed width; a short last batch is filled with one-token rows."""
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f"prompt {i} is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
      raise ValueError(f"prompt {i} has a token id outside the model's vocabulary [0, {vocab_size})")
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    rows = [prompts[i] for i in chunk] + [[PAD_ID]] * (batch_size - len(chunk))
    yield (chunk, *left_pad(rows, bucket_width(max(map(len, rows)), 8)))


def check_batch_size(mesh, batch_size: int) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of mesh data x fsdp = {shards}")


def prefill(model, prompt_tokens, prompt_lengths, cache_len):
  """Left-padded prompts [B, P] through a fresh cache of cache_len slots: (hidden states [B, P, H], cache). Every
  prompt keeps its own positions and ends in the last column."""
  batch, width = prompt_tokens.shape
  cache = KVCache.create(model.config, batch, cache_len)
  padding = (width - prompt_lengths)[:, None]
  slots = jnp.arange(width)[None]
  valid = slots >= padding
  hidden, new_kv = model.cached_hidden_states(prompt_tokens, jnp.maximum(slots - padding, 0), cache.mask(valid),
                                              cache)
  return hidden, cache.append(new_kv, valid)


def advance(model, cache, tokens, positions):
  """One token per row (tokens [B] at positions [B]) through the trunk and committed to the cache: (cache, final
  hidden states [B, H]). The step every decode loop shares."""
  fed = jnp.ones((tokens.shape[0], 1), bool)
  hidden, new_kv = model.cached_hidden_states(tokens[:, None], positions[:, None], cache.mask(fed), cache)
  return cache.append(new_kv, fed), hidden[:, 0]


def row_keys(seed: int, row_ids):
  """[B] PRNG keys, one per row id: a row's samples do not depend on its batch."""
  return jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(seed)))(row_ids)


def step_keys(keys, step):
  """[B] keys of decode step `step` from the rows' keys."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def decode(graphdef, params, prompt_tokens, prompt_lengths, row_ids, *, sampling: SamplingConfig):
  """Pure generation of one batch. prompt_tokens [B, P] left-padded, prompt_lengths [B], row_ids [B] int32.

  Returns tokens [B, max_new_tokens] (PAD_ID after a row's end), lengths [B] (tokens generated, EOS included) and
  finished [B] (an EOS id was generated).
  """
  model = nnx.merge(graphdef, params)
  batch, width = prompt_tokens.shape
  steps = sampling.max_new_tokens
  eos_ids = jnp.asarray(sampling.eos_ids, jnp.int32)
  keys = row_keys(sampling.seed, row_ids)
  hidden, cache = prefill(model, prompt_tokens, prompt_lengths, width + steps)
  logits = model.lm_logits(hidden[:, -1:])[:, 0]  # Left padding: every prompt ends in the last column.

  def keep_going(carry):
    step, _, _, _, done, _ = carry
    return (step < steps) & ~jnp.all(done)

  def step_once(carry):
    step, cache, logits, out, done, lengths = carry
    token = jnp.where(done, PAD_ID, next_tokens(logits, step_keys(keys, step), sampling))
    out = out.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    cache, hidden = advance(model, cache, token, prompt_lengths + step)
    return step + 1, cache, model.lm_logits(hidden), out, done, lengths

  carry = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((batch, steps), PAD_ID, jnp.int32),
           jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
  _, _, _, out, done, lengths = jax.lax.while_loop(keep_going, step_once, carry)
  return out, lengths, done


@dataclasses.dataclass(frozen=True)
class Sample:
  completion_ids: np.ndarray  # Generated tokens, ending with an EOS id when finished.
  finished: bool  # An EOS id was generated (else the row was cut at max_new_tokens).


class Sampler:
  """Generates completions for many prompts in fixed-size batches on a mesh (batch over data x fsdp)."""

  def __init__(self, graphdef, params, sampling: SamplingConfig, mesh, batch_size: int = 16):
    check_batch_size(mesh, batch_size)
    self.graphdef, self.params, self.sampling, self.mesh = graphdef, params, sampling, mesh
    self.batch_size = batch_size
    self.vocab_size = params["embedding"].shape[0]
    check_in_vocabulary(sampling.eos_ids, self.vocab_size, "sampling eos_ids")
    self._rows = sharding.batch_sharding(mesh, 2)
    self._per_row = sharding.batch_sharding(mesh, 1)
    self._decode = jax.jit(functools.partial(decode, graphdef, sampling=sampling))

  def generate(self, prompts: Sequence[Sequence[int]], row_ids: Sequence[int] | None = None) -> list[Sample]:
    """One sample per prompt, in input order. row_ids (default 0..n-1) pick each row's random stream."""
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(prompts):
      raise ValueError(f"got {len(row_ids)} row_ids for {len(prompts)} prompts")
    out: list[Sample | None] = [None] * len(prompts)
    for chunk, tokens, lengths in prompt_batches(prompts, self.batch_size, self.vocab_size):
      ids = np.asarray([row_ids[i] for i in chunk] + [0] * (self.batch_size - len(chunk)), np.int32)
      with jax.set_mesh(self.mesh):
        generated, counts, finished = jax.device_get(self._decode(
            self.params, jax.device_put(tokens, self._rows), jax.device_put(lengths, self._per_row),
            jax.device_put(ids, self._per_row)))
      for row, i in enumerate(chunk):
        out[i] = Sample(generated[row, :counts[row]].copy(), bool(finished[row]))
    return out
