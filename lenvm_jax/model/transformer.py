"""Decoder-only trunk (Llama / Qwen2 / Qwen3 layouts) with an LM head and the length-value head.

Numerics: parameters are float32; matmuls run in `config.dtype`; RMSNorm statistics, softmax and the value head run
in float32. Every parameter carries `logical_axes` metadata that lenvm_jax.sharding maps onto the mesh.

Packing: `segment_ids` (0 = padding) keep several sequences in one row from attending to each other, and `positions`
restart per sequence, so RoPE sees each sequence as if it were alone.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lenvm_jax.model.config import ModelConfig
from lenvm_jax.sharding import constrain

_init = nnx.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, shape, logical_axes, init=_init) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=tuple(logical_axes))


def _zeros(shape, logical_axes) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=tuple(logical_axes))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, logical_axis: str = "norm"):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(logical_axis,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...]).astype(x.dtype)


def rotary_embedding(x, positions, theta: float):
  """RoPE in the Hugging Face (rotate-half) layout. x: [B, T, N, D]; positions: [B, T]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention_mask(segment_ids):
  """[B, 1, 1, T, T] bool: causal, same segment, and never to or from padding (segment 0)."""
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids != 0)[:, :, None]
  return (causal[None] & same & real)[:, None, None]


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.q = _param(rngs, (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))
    self.k = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
    self.v = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
    self.o = _param(rngs, (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"))
    if c.qkv_bias:
      self.q_bias = _zeros((c.num_heads, c.head_dim), ("heads", "head_dim"))
      self.k_bias = _zeros((c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"))
      self.v_bias = _zeros((c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"))
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, "head_dim")
      self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, "head_dim")

  def project(self, x, positions):
    """q [B, T, heads, D] and k, v [B, T, kv_heads, D], with bias / qk-norm and RoPE applied."""
    c = self.config
    dtype = c.compute_dtype
    project = lambda w: jnp.einsum("btd,dnh->btnh", x, w[...].astype(dtype))
    q, k, v = project(self.q), project(self.k), project(self.v)
    if c.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dtype), k + self.k_bias[...].astype(dtype),
                 v + self.v_bias[...].astype(dtype))
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return rotary_embedding(q, positions, c.rope_theta), rotary_embedding(k, positions, c.rope_theta), v

  def attend(self, q, k, v, mask):
    """Output [B, T, H] of queries q [B, T, ...] over keys k, v [B, S, ...]; mask [B, 1, 1, T, S]."""
    c = self.config
    dtype = c.compute_dtype
    # Grouped-query attention: query heads are grouped [kv_heads, group] so k and v are never repeated in memory.
    b, t, _, d = q.shape
    q = q.reshape(b, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.num_heads, d)
    return jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dtype))

  def __call__(self, x, positions, mask):
    q, k, v = self.project(x, positions)
    return self.attend(q, k, v, mask)

  def with_cache(self, x, positions, mask, cached_k, cached_v):
    """New tokens attend to cached keys [B, S, ...] followed by their own; mask [B, 1, 1, T, S + T].

    Returns the output and the new tokens' (k, v); the caller decides whether to write them to the cache.
    """
    q, k, v = self.project(x, positions)
    out = self.attend(q, jnp.concatenate([cached_k, k], axis=1), jnp.concatenate([cached_v, v], axis=1), mask)
    return out, (k, v)


class MLP(nnx.Module):
  """SwiGLU."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.dtype = c.compute_dtype
    self.gate = _param(rngs, (c.hidden_size, c.mlp_dim), ("embed", "mlp"))
    self.up = _param(rngs, (c.hidden_size, c.mlp_dim), ("embed", "mlp"))
    self.down = _param(rngs, (c.mlp_dim, c.hidden_size), ("mlp", "embed"))

  def __call__(self, x):
    gate = x @ self.gate[...].astype(self.dtype)
    up = x @ self.up[...].astype(self.dtype)
    return (jax.nn.silu(gate) * up) @ self.down[...].astype(self.dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.attention = Attention(config, rngs)
    self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attention(self.input_norm(x), positions, mask)
    x = x + self.mlp(self.post_attention_norm(x))
    return constrain(x, ("batch", "length", "embed"))

  def with_cache(self, x, positions, mask, cached_k, cached_v):
    attended, new_kv = self.attention.with_cache(self.input_norm(x), positions, mask, cached_k, cached_v)
    x = x + attended
    x = x + self.mlp(self.post_attention_norm(x))
    return constrain(x, ("batch", "length", "embed")), new_kv


class ValueHead(nnx.Module):
  """Spec section 2: z = W2 . SiLU(W1 . h + b1) + b2, in float32. The caller turns z into a prediction."""

  def __init__(self, hidden_size: int, rngs: nnx.Rngs):
    self.fc = _param(rngs, (hidden_size, hidden_size), ("embed", "value_hidden"))
    self.fc_bias = _zeros((hidden_size,), ("value_hidden",))
    self.summary = _param(rngs, (hidden_size, 1), ("value_hidden", "value_out"))
    self.summary_bias = _zeros((1,), ("value_out",))

  def __call__(self, hidden):
    h = hidden.astype(jnp.float32)
    h = jax.nn.silu(h @ self.fc[...] + self.fc_bias[...])
    return (h @ self.summary[...] + self.summary_bias[...])[..., 0]


class LengthValueModel(nnx.Module):
  """Shared trunk + LM head + length-value head."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embedding = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(c, rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
    if not c.tie_embeddings:
      self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))
    self.value_head = ValueHead(c.hidden_size, rngs)

  def hidden_states(self, tokens, positions, segment_ids):
    """Final hidden states after the final norm: [B, T, H] in the compute dtype."""
    c = self.config
    x = self.embedding[...].astype(c.compute_dtype)[tokens]
    x = constrain(x, ("batch", "length", "embed"))
    mask = attention_mask(segment_ids)
    for layer in self.layers:
      if c.remat == "none":
        x = layer(x, positions, mask)
      else:
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if c.remat == "dots" else None)
        x = nnx.remat(lambda mdl, *a: mdl(*a), policy=policy)(layer, x, positions, mask)
    return self.final_norm(x)

  def cached_hidden_states(self, tokens, positions, mask, cache):
    """Final hidden states [B, T, H] of new tokens that attend to a KV cache (lenvm_jax/model/kv_cache.py).

    mask [B, 1, 1, T, S + T] says what each new token sees among the S cache slots and the T new tokens (built by
    KVCache.mask). Returns the hidden states and the new tokens' per-layer (k, v), which the caller may commit
    with KVCache.append (decoding) or drop (scoring alternative next tokens against a shared prefix).
    """
    x = self.embedding[...].astype(self.config.compute_dtype)[tokens]
    x = constrain(x, ("batch", "length", "embed"))
    new_kv = []
    for layer, cached_k, cached_v in zip(self.layers, cache.keys, cache.values):
      x, kv = layer.with_cache(x, positions, mask, cached_k, cached_v)
      new_kv.append(kv)
    return self.final_norm(x), tuple(new_kv)

  def lm_logits(self, hidden):
    """[B, T, vocab] float32 next-token logits."""
    dtype = self.config.compute_dtype
    if self.config.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", hidden, self.embedding[...].astype(dtype))
    else:
      logits = hidden @ self.lm_head[...].astype(dtype)
    return logits.astype(jnp.float32)

  def value_logits(self, hidden):
    """[B, T] float32 raw value-head output z (the reference servers return this)."""
    return self.value_head(hidden)

  def __call__(self, tokens, positions, segment_ids):
    return self.value_logits(self.hidden_states(tokens, positions, segment_ids))
