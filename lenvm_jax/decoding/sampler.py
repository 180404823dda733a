"""The pieces every decode loop is built from: sampling settings and filters, per-row random streams, left
padding to bucketed widths, and the KV-cache prefill / one-token advance. The loop itself is the decode engine's
(lenvm_jax/decoding/engine.py); batch generation over it is lenvm_jax/decoding/generation.py.

Prompts of different lengths share a prefill: they are left-padded to a common width (a power of two, so a few
shapes cover all batches), keep their own RoPE positions, and never attend to padding (lenvm_jax/model/kv_cache.py).

Sampling filters are small pure functions applied in the order temperature -> top-k -> top-p -> min-p (the order
of Hugging Face `generate`); temperature 0 is greedy (argmax of the raw logits, first index on ties). Each setting
is one number for all rows or one value per row (the engine's requests each bring theirs). Two semantics
(SamplingConfig.filter_style): "hf" (default) keeps top-k ties and measures top-p on the distribution renormalised
after top-k, keeping a token while the mass before it is below p; "reference" (the LenVM reference server) keeps
exactly k tokens and measures top-p on the un-renormalised top-k probabilities, keeping a token while the mass
before it is at most p. They differ at settings like LIFEBench's top_k 15, top_p 0.999, where the renormalised
tail is cut and the raw one is not.
Randomness is per row: row i's key is fold_in(key(seed), row_id[i]) and step t uses fold_in(row key, t), so a
sample does not depend on which other rows share its batch or on the batch size.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


def _per_row(setting, logits, dtype):
  """A sampling setting as a [B, 1] column: a Python number for every row, or one value per row ([B] array)."""
  return jnp.broadcast_to(jnp.asarray(setting, dtype), logits.shape[:1])[:, None]


def _if_any_row(on, apply, logits):
  """apply(logits) when some row has the filter on, else logits untouched: a filter no row asked for costs no sort
  of the vocabulary (apply leaves the rows where it is off unchanged)."""
  return jax.lax.cond(jnp.any(on), apply, lambda x: x, logits)


def scale_by_temperature(logits, temperature):
  """Logits over temperature; a row at temperature 0 (greedy: next_tokens takes its raw argmax) is left unscaled."""
  t = _per_row(temperature, logits, jnp.float32)
  return logits / jnp.where(t > 0, t, 1.0)


def top_k_filter(logits, k):
  """Keeps the k largest logits of each row (and any tied with the k-th); the rest become -inf. k = 0 keeps all.
  k: an int or one per row."""
  if isinstance(k, int) and (k <= 0 or k >= logits.shape[-1]):
    return logits
  if isinstance(k, int):  # One k for all rows: a partial sort is enough.
    return jnp.where(logits < jax.lax.top_k(logits, k)[0][..., -1:], -jnp.inf, logits)
  k = _per_row(k, logits, jnp.int32)
  on = (k > 0) & (k < logits.shape[-1])
  kth = lambda x: jnp.take_along_axis(-jnp.sort(-x, axis=-1), jnp.clip(k - 1, 0, x.shape[-1] - 1), axis=-1)
  return _if_any_row(on, lambda x: jnp.where(on & (x < kth(x)), -jnp.inf, x), logits)


def top_p_filter(logits, p):
  """Keeps the smallest set of most likely tokens whose probability reaches p (at least one token); p = 1 is off."""
  if isinstance(p, float) and p >= 1.0:
    return logits
  p = _per_row(p, logits, jnp.float32)

  def apply(logits):
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # Probability of all more likely tokens.
    kept = mass_before < p
    threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((p < 1.0) & (probs < threshold), -jnp.inf, logits)
  return _if_any_row(p < 1.0, apply, logits)


def min_p_filter(logits, min_p):
  """Keeps tokens whose probability is at least min_p times the most likely token's; min_p = 0 is off."""
  if isinstance(min_p, float) and min_p <= 0.0:
    return logits
  min_p = _per_row(min_p, logits, jnp.float32)

  def apply(logits):
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)
  return _if_any_row(min_p > 0.0, apply, logits)


def reference_filter(logits, top_k, top_p, min_p):
  """The reference server's candidate set: probabilities sorted, the first top_k kept (exactly k, no ties), then
  top-p on those un-renormalised probabilities keeping a token while the mass before it is <= top_p, then min-p
  against the most likely token. The most likely token is always kept. Kept logits are unchanged. Each setting: a
  number or one per row."""
  vocab = logits.shape[-1]
  top_k, top_p = _per_row(top_k, logits, jnp.int32), _per_row(top_p, logits, jnp.float32)
  min_p = _per_row(min_p, logits, jnp.float32)

  def apply(logits):
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs, order = jax.lax.top_k(probs, vocab)
    rank = jnp.arange(vocab)
    kept = jnp.where((top_k > 0) & (top_k < vocab), sorted_probs * (rank < top_k), sorted_probs)
    kept = jnp.where((top_p < 1.0) & (jnp.cumsum(kept, axis=-1) - kept > top_p), 0.0, kept)
    kept = jnp.where((min_p > 0.0) & (kept < min_p * kept[..., :1]), 0.0, kept)
    keep = (kept > 0) | (rank == 0)
    keep = jnp.put_along_axis(jnp.zeros(probs.shape, bool), order, keep, axis=-1, inplace=False)
    return jnp.where(keep | ~on, logits, -jnp.inf)
  on = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0) | (min_p > 0.0)
  return _if_any_row(on, apply, logits)


def filter_rows(logits, temperature, top_k, top_p, min_p, filter_style: str = "hf"):
  """Temperature, then top-k, top-p and min-p (-inf = excluded): the logits the next token is drawn from. Each
  setting is a number for every row or a [B] array, one per row (the decode engine's requests each bring theirs);
  a row's result does not depend on the other rows' settings."""
  logits = scale_by_temperature(logits.astype(jnp.float32), temperature)
  if filter_style == "reference":
    return reference_filter(logits, top_k, top_p, min_p)
  return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)


def filter_logits(logits, sampling: SamplingConfig):
  """filter_rows with one SamplingConfig for every row."""
  return filter_rows(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                     sampling.filter_style)


SAMPLE_BLOCK = 256  # Vocabulary block of the two-level inverse-CDF draw (categorical_rows).


def categorical_rows(keys, filtered):
  """[B] draws from softmax(filtered) [B, V], one uniform per row (keys [B]), by inverse CDF in two levels: the
  block (of SAMPLE_BLOCK tokens) whose cumulative mass passes the uniform, then the token within it.

  Why not jax.random.categorical: it draws V Gumbel numbers per row, and on CPU generating 64 x 49,152 of them took
  ~115 ms of a ~700 ms SmolLM2 decode step; this takes ~5 ms. Exact up to float32 rounding of the partial sums; a
  token of probability 0 (filtered out) is never drawn: the first partial sum above a target below the total is
  always at a token that adds mass."""
  batch, vocab = filtered.shape
  blocks = -(-vocab // SAMPLE_BLOCK)
  probs = jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True))
  probs = jnp.pad(probs, ((0, 0), (0, blocks * SAMPLE_BLOCK - vocab))).reshape(batch, blocks, SAMPLE_BLOCK)
  block_mass = probs.sum(-1)
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  total = block_cdf[:, -1]
  target = jnp.minimum(jax.vmap(jax.random.uniform)(keys) * total, total * (1 - 2**-20))
  block = jnp.argmax(block_cdf > target[:, None], axis=-1)
  take = lambda x: jnp.take_along_axis(x, block.reshape((batch,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  inner = take(probs)  # [B, SAMPLE_BLOCK]
  inner_cdf = jnp.cumsum(inner, axis=-1)
  rest = jnp.clip(target - (take(block_cdf) - take(block_mass)), 0.0, inner_cdf[:, -1] * (1 - 2**-20))
  return (block * SAMPLE_BLOCK + jnp.argmax(inner_cdf > rest[:, None], axis=-1)).astype(jnp.int32)


def sample_rows(logits, filtered, temperature, keys):
  """[B] next tokens: a draw from each row's filtered logits with its own key; the raw argmax (first index on ties)
  where a row's temperature is 0."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return greedy
  drawn = categorical_rows(keys, filtered)
  return jnp.where(_per_row(temperature, logits, jnp.float32)[:, 0] > 0, drawn, greedy)


def next_tokens(logits, keys, sampling: SamplingConfig):
  """[B] next tokens from [B, V] logits, one PRNG key per row."""
  return sample_rows(logits, filter_logits(logits, sampling), sampling.temperature, keys)


def bucket_width(longest: int, smallest: int) -> int:
  """The power of two >= longest (at least `smallest`, a power of two): few distinct shapes, so few compiles."""
  return max(smallest, 1 << (max(longest, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, width] int32 prompts aligned to end at the last column, and their lengths."""
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f"prompt {i} is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
      raise ValueError(f"prompt {i} has a token id outside the model's vocabulary [0, {vocab_size})")


def check_batch_size(mesh, batch_size: int) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of mesh data x fsdp = {shards}")


PREFILL_CHUNK = 512  # Prompts wider than this are prefilled in chunks: attention scores stay [chunk, cache].


def prefill(model, prompt_tokens, prompt_lengths, cache_len, chunk: int = PREFILL_CHUNK):
  """Left-padded prompts [B, P] through a fresh cache of cache_len slots: (hidden states [B, P, H], cache). Every
  prompt keeps its own positions and ends in the last column. A prompt wider than `chunk` goes through in chunks
  (each sees the cache the earlier ones wrote), so a long prompt never builds a [P, P] score matrix."""
  batch, width = prompt_tokens.shape
  cache = KVCache.create(model.config, batch, cache_len)
  padding = (width - prompt_lengths)[:, None]
  slots = jnp.arange(width)[None]
  valid = slots >= padding
  positions = jnp.maximum(slots - padding, 0)
  hidden = []
  for start in range(0, width, chunk):
    part = slice(start, min(start + chunk, width))
    h, new_kv = model.cached_hidden_states(prompt_tokens[:, part], positions[:, part], cache.mask(valid[:, part]),
                                           cache)
    cache = cache.append(new_kv, valid[:, part])
    hidden.append(h)
  return jnp.concatenate(hidden, axis=1) if len(hidden) > 1 else hidden[0], cache


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
