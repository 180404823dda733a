import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import (CAUSAL_QUERY_BLOCKS, MIN_QUERY_BLOCK, Attention, LengthValueModel,
                                         attention_mask, dense)
from lenvm_jax.model.transformer import abstract_model


def _model(**overrides):
  # Eager init: its per-op compiles are shared by every config here (a jitted init is one compile per config).
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 50, **overrides})
  return LengthValueModel(config, nnx.Rngs(0))


def _forward(model):
  """model(tokens, positions, segments), jitted: one compile per shape, not an eager compile per op."""
  return functools.partial(nnx.jit(lambda model, *inputs: model(*inputs)), model)


LAYOUTS = [dict(), dict(qkv_bias=True), dict(qk_norm=True, tie_embeddings=True)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=["llama", "qwen2", "qwen3"])
def test_packed_sequences_match_separate_rows(layout):
  """Two sequences packed in one row (segment ids, restarting positions) give the outputs they give alone."""
  model = _forward(_model(**layout))
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 50, 7), rng.integers(1, 50, 5)
  packed = jnp.asarray(np.concatenate([a, b, [0, 0, 0, 0]]))[None]
  positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(5), [0, 0, 0, 0]]))[None]
  segments = jnp.asarray([1] * 7 + [2] * 5 + [0, 0, 0, 0])[None]
  z_packed = model(packed, positions, segments)[0]
  z_a = model(jnp.asarray(a)[None], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))[0]
  z_b = model(jnp.asarray(b)[None], jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))[0]
  np.testing.assert_allclose(z_packed[:7], z_a, atol=1e-5)
  np.testing.assert_allclose(z_packed[7:12], z_b, atol=1e-5)


def test_causal_query_blocks_equal_one_block():
  """Attention in causal query blocks equals the one-block computation, values and gradients, on a packed mask."""
  attention = Attention(ModelConfig(**{**preset_fields("tiny"), "vocab_size": 50}), nnx.Rngs(0))  # 4 / 2 heads.
  b, t, d = 2, CAUSAL_QUERY_BLOCKS * MIN_QUERY_BLOCK, attention.config.head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, 4, d))
  k, v = jax.random.normal(keys[1], (b, t, 2, d)), jax.random.normal(keys[2], (b, t, 2, d))
  mask = attention_mask(jnp.asarray([[1] * 100 + [2] * (t - 116) + [0] * 16, [1] * t]))  # Segments cross blocks.
  blocked = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, mask)))
  one_block = lambda q, k, v: jnp.sum(jnp.sin(dense(attention.attend_block(q, k, v, mask), attention.o[...], 2)))
  value_and_grads = lambda f: jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
  (v_blocked, grads_blocked), (v_one, grads_one) = value_and_grads(blocked), value_and_grads(one_block)
  np.testing.assert_allclose(v_blocked, v_one, rtol=1e-5)
  for g_blocked, g_one in zip(grads_blocked, grads_one):
    np.testing.assert_allclose(g_blocked, g_one, atol=1e-5)


def test_causal_future_tokens_do_not_change_the_past():
  model = _forward(_model())
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 50, (1, 10)))
  changed = tokens.at[0, 6:].set(3)
  pos, seg = jnp.arange(10)[None], jnp.ones((1, 10), jnp.int32)
  z1, z2 = model(tokens, pos, seg), model(changed, pos, seg)
  np.testing.assert_allclose(z1[0, :6], z2[0, :6], atol=1e-6)
  assert not np.allclose(z1[0, 6:], z2[0, 6:])


@pytest.mark.slow
def test_value_head_is_float32_in_bf16_compute_and_close_to_fp32():
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, 50, (2, 12)))
  pos, seg = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
  z32 = _forward(_model())(tokens, pos, seg)
  z16 = _forward(_model(dtype="bfloat16"))(tokens, pos, seg)
  assert z16.dtype == jnp.float32
  np.testing.assert_allclose(z16, z32, atol=5e-2)


# Trunk + LM head parameter counts of the public checkpoints (tied embeddings). Qwen2.5: the exact totals of the
# released safetensors. Qwen3-1.7B: its card says 1.7B total, 1.4B non-embedding (checked to 0.05B below).
PUBLIC_PARAM_COUNTS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
                       "qwen3-8b": 8_190_735_360, "qwen3-32b": 32_762_123_264}


def test_qwen3_preset_matches_its_card():
  config = ModelConfig(**preset_fields("qwen3-1.7b"))
  params = abstract_model(config)[1].to_pure_dict()
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves({k: v for k, v in params.items() if k != "value_head"}))
  embedding = config.vocab_size * config.hidden_size
  assert abs(total - 1.7e9) < 0.05e9 and abs(total - embedding - 1.4e9) < 0.05e9


@pytest.mark.parametrize("preset", sorted(PUBLIC_PARAM_COUNTS))
def test_real_presets_have_the_public_parameter_count(preset):
  config = ModelConfig(**preset_fields(preset))
  _, state = abstract_model(config)
  params = state.to_pure_dict()
  trunk = sum(int(np.prod(x.shape)) for k, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if "value_head" not in jax.tree_util.keystr(k))
  assert trunk == PUBLIC_PARAM_COUNTS[preset]
  head = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["value_head"]))
  h = config.hidden_size
  assert head == h * h + h + h + 1  # docs/method.md §3: W1 [H, H], b1, W2 [1, H], b2.


def test_every_parameter_has_logical_axes_matching_its_rank():
  _, state = abstract_model(ModelConfig(**{**preset_fields("tiny"), "vocab_size": 50, "qkv_bias": True,
                                           "qk_norm": True}))
  variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert variables
  for v in variables:
    axes = v.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(v.value.shape)


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  tokens = jnp.asarray(np.random.default_rng(3).integers(1, 50, (2, 9)))
  pos, seg = jnp.broadcast_to(jnp.arange(9), (2, 9)), jnp.ones((2, 9), jnp.int32)

  def grads(remat):
    graphdef, params = nnx.split(_model(remat=remat))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, pos, seg) ** 2)
    return jax.jit(jax.grad(loss))(params.to_pure_dict())  # One compile, not one per op of the backward pass.

  reference = jax.tree.leaves(grads("none"))
  for policy in ("full", "dots", "offload"):  # offload: layer inputs in host memory ("pinned_host"; CPU has it too).
    for a, b in zip(reference, jax.tree.leaves(grads(policy))):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_decoder_layers_are_stacked_on_a_replicated_layers_axis():
  """One scanned DecoderLayer with [layers, ...] parameters; a seed draws the weights a list of layers drew."""
  from lenvm_jax.model.transformer import DecoderLayer, _param
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 50})
  _, state = abstract_model(config)
  q = state["layers"]["attention"]["q"]
  assert q.shape == (config.num_layers, config.hidden_size, config.num_heads, config.head_dim)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
  assert dict(sharding.RULES)["layers"] == ()
  rngs = nnx.Rngs(0)
  _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"))  # The embedding draws first.
  first_layers = [nnx.split(DecoderLayer(config, rngs))[1].to_pure_dict() for _ in range(config.num_layers)]
  stacked = nnx.split(LengthValueModel(config, nnx.Rngs(0)))[1].to_pure_dict()["layers"]
  for i, layer in enumerate(first_layers):
    jax.tree.map(lambda s, one: np.testing.assert_array_equal(s[i], one), stacked, layer)


def test_residual_dropout_drops_and_rescales_sublayer_outputs_in_training_only():
  from lenvm_jax.model.transformer import _dropout
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64, 32)), jnp.float32)
  out = np.asarray(_dropout(x, 0.25, jax.random.key(2)))
  kept = out != 0
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)  # Inverted dropout.
  assert abs(kept.mean() - 0.75) < 0.01  # 8,192 draws: 3 sigma is ~0.014.
  assert _dropout(x, 0.25, None) is x

  model = _model(dropout_rate=0.25)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 50, (2, 12)))
  positions, segments = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
  plain = model.hidden_states(tokens, positions, segments)
  same = [model.hidden_states(tokens, positions, segments, jax.random.key(k)) for k in (3, 3, 4)]
  np.testing.assert_array_equal(same[0], same[1])  # A key decides the masks.
  assert not np.allclose(same[0], same[2]) and not np.allclose(same[0], plain)
  # Without a key (evaluation, prediction, decoding) the model is the dropout-free one.
  np.testing.assert_array_equal(plain, _model(dropout_rate=0.0).hidden_states(tokens, positions, segments))
  with pytest.raises(ValueError, match="model.dropout_rate"):
    _model(dropout_rate=1.0)
