"""Key/value cache for autoregressive decoding: a pytree passed into and out of pure functions.

Slots are shared by all rows: slot `index` is the next one written, for every row at once. Rows of different
prompt lengths are left-padded, so their prompts end at the same slot and every decode step writes one slot for the
whole batch; `valid` marks slots that hold real tokens (padding stays invalid and is never attended to). RoPE
positions are explicit (the caller passes each token's position in its own sequence), so a row's padding does not
shift its positions.

New tokens meet the cache through `mask`: either as a continuation (each new token sees the valid cache slots and
the earlier valid new tokens: prefill, decode steps) or as alternatives (each sees the cache and only itself: k
candidate next tokens per row scored against one shared prefix, without committing any; see
LengthValueModel.cached_hidden_states). `append` commits new tokens' keys and values.

Keys and values are stacked over layers ([layers, B, kv_heads, S, head_dim]), as the model's parameters are, so the
model's scan over layers reads each layer's cache as its slice; heads before slots, so each (row, head) is one
contiguous [S, head_dim] block that attention multiplies in place (Attention.with_cache).
"""

import flax.struct
import jax
import jax.numpy as jnp

from lenvm_jax.model_config import ModelConfig
from lenvm_jax.sharding import constrain

_KV_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


@flax.struct.dataclass
class KVCache:
  keys: jax.Array  # [layers, B, kv_heads, S, head_dim], compute dtype.
  values: jax.Array
  valid: jax.Array  # [B, S] bool: the slot holds a real token.
  index: jax.Array  # int32 scalar: the next slot to write.

  @classmethod
  def create(cls, config: ModelConfig, batch_size: int, max_len: int) -> "KVCache":
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
    empty = lambda: constrain(jnp.zeros(shape, config.compute_dtype), _KV_AXES)
    return cls(keys=empty(), values=empty(), valid=jnp.zeros((batch_size, max_len), bool),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def mask(self, new_valid, alternatives: bool = False):
    """[B, 1, 1, T, S + T] attention mask of T new tokens (new_valid [B, T] bool) over cache slots + themselves."""
    t = new_valid.shape[1]
    among_new = jnp.eye(t, dtype=bool) if alternatives else jnp.tril(jnp.ones((t, t), bool))
    to_cache = jnp.broadcast_to(self.valid[:, None, :], (self.valid.shape[0], t, self.max_len))
    to_new = among_new[None] & new_valid[:, None, :]
    return jnp.concatenate([to_cache, to_new], axis=-1)[:, None, None]

  def append(self, new_kv, new_valid) -> "KVCache":
    """Writes T new tokens' (keys, values), each [layers, B, kv_heads, T, head_dim], at slots index .. index + T - 1
    (caller keeps it in range). With a per-row index ([B], `per_row`), each row writes at its own slots; writes past
    the end are dropped (a free slot of the decode engine keeps stepping until a request takes it)."""
    new_keys, new_values = new_kv
    t = new_valid.shape[1]
    if self.index.ndim:
      rows = jnp.arange(self.valid.shape[0])[:, None]
      columns = self.index[:, None] + jnp.arange(t)[None]
      # Indices split by a slice put their [B, T] dims first: the written block is [B, T, layers, kv_heads, D].
      write = lambda cache, new: constrain(cache.at[:, rows, :, columns].set(
          new.astype(cache.dtype).transpose(1, 3, 0, 2, 4), mode="drop"), _KV_AXES)
      valid = self.valid.at[rows, columns].set(new_valid, mode="drop")
    else:
      write = lambda cache, new: constrain(
          jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), self.index, axis=3), _KV_AXES)
      valid = jax.lax.dynamic_update_slice_in_dim(self.valid, new_valid, self.index, axis=1)
    return KVCache(keys=write(self.keys, new_keys), values=write(self.values, new_values), valid=valid,
                   index=self.index + t)

  def per_row(self) -> "KVCache":
    """The same cache with one write index per row, so rows can hold sequences admitted at different times."""
    return self.replace(index=jnp.broadcast_to(self.index, self.valid.shape[:1]).astype(jnp.int32))

  def take_rows(self, rows) -> "KVCache":
    """Rows `rows` ([b]) of this per-row cache as a b-row cache."""
    return KVCache(keys=self.keys[:, rows], values=self.values[:, rows], valid=self.valid[rows],
                   index=self.index[rows])

  def put_rows(self, rows, other: "KVCache") -> "KVCache":
    """This per-row cache with rows[i] replaced by row i of `other` (same max_len); rows out of range are dropped
    (padding of a partly filled admission)."""
    put = lambda mine, theirs, axis: (mine.at[:, rows].set(theirs.astype(mine.dtype), mode="drop") if axis else
                                      mine.at[rows].set(theirs, mode="drop"))
    return KVCache(keys=constrain(put(self.keys, other.keys, 1), _KV_AXES),
                   values=constrain(put(self.values, other.values, 1), _KV_AXES),
                   valid=put(self.valid, other.valid, 0), index=put(self.index, other.per_row().index, 0))


def take_alternative(new_kv, choice):
  """The (keys, values) [layers, B, kv_heads, 1, D] of one alternative per row (choice [B] int) out of new tokens'
  (keys, values) [layers, B, kv_heads, T, D]: what a guided decoder commits after scoring T candidates."""
  pick = lambda x: jnp.take_along_axis(x, choice[None, :, None, None, None], axis=3)
  return tuple(pick(x) for x in new_kv)
