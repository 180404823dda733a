"""Decoder-only trunk (Llama / Qwen2 / Qwen3 layouts) with an LM head and the length-value head.

Numerics: parameters are float32; matmuls run in `config.dtype`; RMSNorm statistics, softmax and the value head run
in float32. Every parameter carries `logical_axes` metadata that lenvm_jax.sharding maps onto the mesh.

Packing: `segment_ids` (0 = padding) keep several sequences in one row from attending to each other, and `positions`
restart per sequence, so RoPE sees each sequence as if it were alone.

Layers: the decoder layers are one DecoderLayer whose parameters carry a leading `layers` axis, run by a
jax.lax.scan. The compiler sees one layer body whatever the depth (compile time stays flat), and with remat the
backward pass recomputes one layer at a time: a Python loop of layers let XLA's scheduler hoist every layer's
recompute, so remat saved no peak memory on TPU (docs/scaling.md).

Longer than most modules (~400 lines) because the whole model is here, as in the Flax NNX examples: layers, trunk,
heads and the cached forward read top to bottom in one file.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lenvm_jax.model import attention as attention_kernels
from lenvm_jax.model.candidate_head import CandidateValueHead
from lenvm_jax.model_config import ModelConfig
from lenvm_jax.sharding import constrain

_init = nnx.initializers.normal(stddev=0.02)
# Query blocks for causal self-attention (Attention.attend): 4 skips 3/8 of the score work; more blocks skip more
# but add ops, and gained nothing further at 256 - 1024 tokens on CPU (experiments/bench.py). Rows shorter than
# 4 x MIN_QUERY_BLOCK run in one block: attention is cheap there and each block adds compile time.
CAUSAL_QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 64
# The logical axis of the stacked decoder layers (replicated: every device scans over all layers).
LAYERS_AXIS = "layers"
# The name of each layer's input inside the scan, which `remat="offload"` moves to host memory.
LAYER_INPUT = "decoder_layer_input"


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


def dense(x, w, contract: int = 1):
  """x [..., *in] times w [*in, *out] (the last `contract` dims of x against the first of w) as one 2-D matmul.

  Why 2-D: for a 3-D einsum such as 'btd,dnh->btnh', XLA:CPU lays out the weight gradient with transposing copies
  that cost about a fifth of a CPU train step (experiments/bench.py); the reshapes here are free on every backend.
  """
  in_size = math.prod(w.shape[:contract])
  y = x.reshape(-1, in_size) @ w.reshape(in_size, -1)
  return y.reshape(*x.shape[:x.ndim - contract], *w.shape[contract:])


def lm_logits(hidden, weight):
  """Next-token logits [..., vocab] in float32 from hidden states [..., H] and the LM head [H, vocab]."""
  return dense(hidden, weight).astype(jnp.float32)


def rotary_tables(positions, head_dim: int, theta: float):
  """RoPE (sin, cos), each [B, T, 1, head_dim // 2] float32: computed once per forward and shared by all layers.

  "Once" needs care: XLA fuses elementwise producers into their consumers, so sin / cos would be recomputed inside
  each layer's q and k RoPE, forward and backward (16 times for 4 layers), and XLA:CPU drops
  lax.optimization_barrier. A product with the identity (exact at HIGHEST precision) is not fused into consumers,
  so the tables are materialised once; this saves about 5% of a CPU train step (experiments/bench.py).
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  table = jnp.matmul(table, jnp.eye(2 * half, dtype=jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return table[:, :, None, :half], table[:, :, None, half:]


def rotary_embedding(x, rope):
  """RoPE in the Hugging Face (rotate-half) layout. x: [B, T, N, D]; rope: rotary_tables(...)."""
  sin, cos = rope
  half = x.shape[-1] // 2
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

  def project(self, x, rope):
    """q [B, T, heads, D] and k, v [B, T, kv_heads, D], with bias / qk-norm and RoPE applied."""
    c = self.config
    dtype = c.compute_dtype
    q, k, v = (dense(x, w[...].astype(dtype)) for w in (self.q, self.k, self.v))
    if c.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dtype), k + self.k_bias[...].astype(dtype),
                 v + self.v_bias[...].astype(dtype))
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return rotary_embedding(q, rope), rotary_embedding(k, rope), v

  def attend(self, q, k, v, mask):
    """Output [B, T, H] of queries q [B, T, heads, D] over keys k, v [B, S, kv_heads, D]; mask [B, 1, 1, T, S].

    Self-attention (S == T) runs as CAUSAL_QUERY_BLOCKS query blocks, each over only the keys up to its own end:
    the causal mask hides the rest anyway, so this skips (blocks - 1) / (2 x blocks) of the score work exactly.
    """
    t = q.shape[1]
    if k.shape[1] == t and t % CAUSAL_QUERY_BLOCKS == 0 and t >= CAUSAL_QUERY_BLOCKS * MIN_QUERY_BLOCK:
      size = t // CAUSAL_QUERY_BLOCKS
      out = jnp.concatenate([
          self.attend_block(q[:, i * size:end], k[:, :end], v[:, :end], mask[..., i * size:end, :end])
          for i, end in enumerate(range(size, t + 1, size))], axis=1)
    else:
      out = self.attend_block(q, k, v, mask)
    return dense(out, self.o[...].astype(self.config.compute_dtype), contract=2)

  def fold_query_groups(self, q):
    """q [B, T, heads, D] -> [B, kv_heads, group x T, D], scaled by 1/sqrt(D): each kv head's query group folded into
    the query axis, so grouped-query k and v are never repeated (the scale goes on q, smaller than the scores)."""
    b, t, _, d = q.shape
    kv_heads = self.config.num_kv_heads
    group = self.config.num_heads // kv_heads
    return (q * (d ** -0.5)).reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads,
                                                                                                  group * t, d)

  def unfold_query_groups(self, out, t: int):
    """fold_query_groups' inverse on attention outputs: [B, kv_heads, group x T, D] -> [B, T, heads, D]."""
    b, kv_heads, _, d = out.shape
    group = self.config.num_heads // kv_heads
    return out.reshape(b, kv_heads, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * group, d)

  def attend_block(self, q, k, v, mask):
    """Attention output [B, T, heads, D] before the output projection.

    Heads-major, with each query group folded into the query axis: one [group x T, D] x [D, S] matmul per
    (batch, kv head), so grouped-query k and v are never repeated, and XLA:CPU needs no transposing copies around
    the batched matmuls (about 2x faster on CPU than the 5-D einsum form).
    """
    c = self.config
    dtype = c.compute_dtype
    b, t = q.shape[:2]
    s = k.shape[1]
    kv_heads, group = c.num_kv_heads, c.num_heads // c.num_kv_heads
    q = self.fold_query_groups(q)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv_heads, S, D]
    scores = (q @ k.swapaxes(-1, -2)).astype(jnp.float32).reshape(b, kv_heads, group, t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kv_heads, group * t, s)
    return self.unfold_query_groups(probs @ v, t)

  def __call__(self, x, rope, mask, segment_ids=None, impl: str = "xla"):
    """Self-attention of x [B, T, H]: by `mask` (Attention.attend, impl "xla") or by a kernel over `segment_ids`
    (model/attention.py; no [T, T] array)."""
    q, k, v = self.project(x, rope)
    if impl == "xla":
      return self.attend(q, k, v, mask)
    out = attention_kernels.self_attention(q, k, v, segment_ids, self.config, impl)
    return dense(out, self.o[...].astype(self.config.compute_dtype), contract=2)

  def with_cache(self, x, rope, mask, cached_k, cached_v):
    """New tokens attend to cached keys and values [B, kv_heads, S, D] followed by their own; mask
    [B, 1, 1, T, S + T].

    Returns the output and the new tokens' (k, v) in the cache's layout [B, kv_heads, T, D]; the caller decides
    whether to write them to the cache. The cache is read where it lies: scores against it and against the new
    tokens are two matmuls joined before one softmax, with the cache as the left operand as it is stored, so a decode
    step never copies, concatenates or transposes the cache (on CPU that halves the time of a decode step's
    attention, which reads the whole cache each step).
    """
    c = self.config
    q, k, v = self.project(x, rope)
    b, t = q.shape[:2]
    kv_heads, group = c.num_kv_heads, c.num_heads // c.num_kv_heads
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv_heads, T, D]: the cache's layout.
    q = self.fold_query_groups(q)
    s = cached_k.shape[2]
    # Scores slot-major, [B, kv_heads, S + T, group x T]: the cache is the matmul's left operand as it is stored.
    scores = jnp.concatenate([jnp.einsum("bhsd,bhqd->bhsq", cached_k, q), jnp.einsum("bhtd,bhqd->bhtq", k, q)],
                             axis=2).astype(jnp.float32).reshape(b, kv_heads, s + t, group, t)
    seen = mask[:, :, 0].swapaxes(-1, -2)[:, :, :, None, :]  # [B, 1, S + T, 1, T]
    scores = jnp.where(seen, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=2).astype(q.dtype).reshape(b, kv_heads, s + t, group * t)
    out = jnp.einsum("bhsq,bhsd->bhqd", probs[:, :, :s], cached_v) + jnp.einsum("bhtq,bhtd->bhqd", probs[:, :, s:], v)
    return dense(self.unfold_query_groups(out, t), self.o[...].astype(c.compute_dtype), contract=2), (k, v)


class MLP(nnx.Module):
  """SwiGLU."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.dtype = c.compute_dtype
    self.gate = _param(rngs, (c.hidden_size, c.mlp_dim), ("embed", "mlp"))
    self.up = _param(rngs, (c.hidden_size, c.mlp_dim), ("embed", "mlp"))
    self.down = _param(rngs, (c.mlp_dim, c.hidden_size), ("mlp", "embed"))

  def __call__(self, x):
    gate = dense(x, self.gate[...].astype(self.dtype))
    up = dense(x, self.up[...].astype(self.dtype))
    return dense(jax.nn.silu(gate) * up, self.down[...].astype(self.dtype))


def _dropout(x, rate: float, key):
  """Inverted dropout: kept units are scaled by 1 / (1 - rate), so evaluation (key None: no dropout) needs no
  rescaling."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0).astype(x.dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.attention = Attention(config, rngs)
    self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = MLP(config, rngs)
    self.dropout_rate = config.dropout_rate

  def __call__(self, x, rope, mask, dropout_key=None, segment_ids=None, attention_impl: str = "xla"):
    """dropout_key (training only) drops each sublayer's output before it joins the residual stream; attention by
    `mask` or, with a kernel attention_impl, by `segment_ids` (Attention.__call__)."""
    attn_key, mlp_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    attended = self.attention(self.input_norm(x), rope, mask, segment_ids, attention_impl)
    x = x + _dropout(attended, self.dropout_rate, attn_key)
    x = x + _dropout(self.mlp(self.post_attention_norm(x)), self.dropout_rate, mlp_key)
    return constrain(x, ("batch", "length", "embed"))

  def with_cache(self, x, rope, mask, cached_k, cached_v):
    attended, new_kv = self.attention.with_cache(self.input_norm(x), rope, mask, cached_k, cached_v)
    x = x + attended
    x = x + self.mlp(self.post_attention_norm(x))
    return constrain(x, ("batch", "length", "embed")), new_kv


def stacked_decoder_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """All decoder layers as one DecoderLayer whose parameters have a leading `layers` axis (scanned over).

  The layers are drawn one after another from `rngs`, as a Python list of layers drew them, so a seed gives the
  same weights as it did before the layers were stacked.
  """
  layers = [DecoderLayer(config, rngs) for _ in range(config.num_layers)]
  graphdef, first = nnx.split(layers[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *(nnx.state(layer) for layer in layers[1:]))
  for variable in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    variable.set_metadata(logical_axes=(LAYERS_AXIS,) + tuple(variable.get_metadata()["logical_axes"]))
  return nnx.merge(graphdef, stacked)


def remat_policy(name: str):
  """jax.checkpoint policy of model.remat (not "none"): what one layer keeps from its forward for its backward.

  full: nothing (the scan keeps each layer's input, the carry); dots: matmul outputs without batch dims;
  offload: like full, but the layer inputs go to host memory ("pinned_host") until the backward pass needs them.
  """
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "offload":
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"no remat policy {name!r}")


class ValueHead(nnx.Module):
  """docs/method.md §3: z = W2 . SiLU(W1 . h + b1) + b2, in float32. The caller turns z into a prediction."""

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

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, unroll_layers: bool = False):
    """unroll_layers: lower the layer scan fully unrolled (same parameters and results), for FLOP counting: XLA's
    cost analysis counts a loop body once (train/step.py train_step_flops)."""
    c = config
    self.config = c
    self.unroll_layers = unroll_layers
    self.embedding = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    self.layers = stacked_decoder_layers(c, rngs)
    self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
    if not c.tie_embeddings:
      self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))
    self.value_head = ValueHead(c.hidden_size, rngs)
    if c.candidate_head != "none":
      self.candidate_head = CandidateValueHead(c.hidden_size, c.vocab_size, c.candidate_head == "tied", rngs)

  def embed(self, tokens, positions):
    """Token embeddings [B, T, H] in the compute dtype and the RoPE tables shared by all layers."""
    c = self.config
    # Re-laid out for the lookup by the "embed_lookup" rule (lenvm_jax/sharding.py): vocab stays sharded over tensor,
    # so the lookup needs only a sum over tensor, and nothing is replicated whole.
    table = constrain(self.embedding[...].astype(c.compute_dtype), ("vocab", "embed_lookup"))
    x = constrain(table[tokens], ("batch", "length", "embed"))
    return x, rotary_tables(positions, c.head_dim, c.rope_theta)

  def hidden_states(self, tokens, positions, segment_ids, dropout_key=None, frozen_layers: int = 0):
    """Final hidden states after the final norm: [B, T, H] in the compute dtype. dropout_key (training only)
    turns on model.dropout_rate. frozen_layers (train.trainable_layers): the embeddings and the bottom
    frozen_layers layers run as a separate scan outside the gradient, so the backward pass skips them."""
    x, rope = self.embed(tokens, positions)
    if frozen_layers:
      x = jax.lax.stop_gradient(self.run_layers(jax.lax.stop_gradient(x), rope, segment_ids, 0, frozen_layers,
                                                dropout_key, stop_gradient=True))
    x = self.run_layers(x, rope, segment_ids, frozen_layers, self.config.num_layers, dropout_key)
    return self.final_norm(x)

  def layer_input(self, tokens, positions, segment_ids, layer: int):
    """The residual stream entering decoder layer `layer` (the output of layers [0, layer), no final norm):
    [B, T, H] in the compute dtype, no dropout. What the frozen-trunk feature cache stores (train/feature_cache.py);
    hidden_states_from(layer_input(..., K), K) is hidden_states(...)."""
    x, rope = self.embed(tokens, positions)
    return self.run_layers(x, rope, segment_ids, 0, layer)

  def hidden_states_from(self, x, positions, segment_ids, layer: int, dropout_key=None):
    """Final hidden states [B, T, H] from the residual stream x [B, T, H] entering decoder layer `layer`: layers
    [layer, num_layers) and the final norm, with the dropout masks hidden_states draws for those layers."""
    rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
    x = constrain(x.astype(self.config.compute_dtype), ("batch", "length", "embed"))
    return self.final_norm(self.run_layers(x, rope, segment_ids, layer, self.config.num_layers, dropout_key))

  def run_layers(self, x, rope, segment_ids, start: int, stop: int, dropout_key=None, stop_gradient=False):
    """Decoder layers [start, stop) of the stack as one scan over x [B, T, H]. Layer i draws dropout key i of
    split(dropout_key, num_layers) whatever range it runs in; stop_gradient: the layers' weights get none."""
    c = self.config
    if start >= stop:
      return x
    impl = attention_kernels.implementation(c, x.shape[1])
    mask = attention_mask(segment_ids) if impl == "xla" else None  # Kernels take the segment ids instead.
    use_dropout = dropout_key is not None and c.dropout_rate > 0
    layer_keys = jax.random.split(dropout_key, c.num_layers)[start:stop] if use_dropout else None
    graphdef, stacked = nnx.split(self.layers)
    if (start, stop) != (0, c.num_layers):
      stacked = jax.tree.map(lambda a: a[start:stop], stacked)
    if stop_gradient:
      stacked = jax.lax.stop_gradient(stacked)

    def one_layer(layer_params, x, key):
      x = checkpoint_name(x, LAYER_INPUT)
      return nnx.merge(graphdef, layer_params)(x, rope, mask, key, segment_ids, impl)

    if c.remat != "none":
      one_layer = jax.checkpoint(one_layer, policy=remat_policy(c.remat), prevent_cse=False)
    scan_body = lambda x, per_layer: (one_layer(per_layer[0], x, per_layer[1]), None)
    x, _ = jax.lax.scan(scan_body, x, (stacked, layer_keys), unroll=self.unroll_layers)
    return x

  def cached_hidden_states(self, tokens, positions, mask, cache):
    """Final hidden states [B, T, H] of new tokens that attend to a KV cache (lenvm_jax/model/kv_cache.py).

    mask [B, 1, 1, T, S + T] says what each new token sees among the S cache slots and the T new tokens (built by
    KVCache.mask). Returns the hidden states and the new tokens' (keys, values), each [layers, B, kv_heads, T, D],
    which the caller may commit with KVCache.append (decoding) or drop (scoring alternative next tokens against a
    shared prefix).
    """
    x, rope = self.embed(tokens, positions)
    graphdef, stacked = nnx.split(self.layers)

    def one_layer(x, per_layer):
      layer_params, cached_k, cached_v = per_layer
      return nnx.merge(graphdef, layer_params).with_cache(x, rope, mask, cached_k, cached_v)

    x, new_kv = jax.lax.scan(one_layer, x, (stacked, cache.keys, cache.values))
    return self.final_norm(x), new_kv

  def lm_head_weight(self):
    """The LM head [H, vocab] in the compute dtype (the embedding's transpose when tied)."""
    weight = self.embedding[...].T if self.config.tie_embeddings else self.lm_head[...]
    return weight.astype(self.config.compute_dtype)

  def lm_logits(self, hidden):
    """[B, T, vocab] float32 next-token logits."""
    return lm_logits(hidden, self.lm_head_weight())

  def value_logits(self, hidden):
    """[B, T] float32 raw value-head output z (the reference servers return this)."""
    return self.value_head(hidden)

  def candidate_logits(self, hidden, token_ids=None):
    """Candidate-value logits z_q (model/candidate_head.py), float32: of token_ids [..., k] as the next token of
    the states hidden [..., H] -> [..., k]; without token_ids, of every token -> [..., vocab]."""
    head = self.candidate_head
    base = jax.lax.stop_gradient(self.value_logits(hidden))[..., None]
    return base + head.deltas(head.features(hidden), head.token_vectors(self.embedding[...]), token_ids)

  def __call__(self, tokens, positions, segment_ids):
    return self.value_logits(self.hidden_states(tokens, positions, segment_ids))


def abstract_model(model_config: ModelConfig, unroll_layers: bool = False):
  """(graphdef, abstract nnx.State with logical_axes metadata) without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: LengthValueModel(model_config, nnx.Rngs(0), unroll_layers)))


def init_params(model_config: ModelConfig, seed: int) -> dict:
  return nnx.split(LengthValueModel(model_config, nnx.Rngs(seed)))[1].to_pure_dict()
