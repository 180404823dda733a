"""The Pallas attention kernels (model/attention.py) against today's XLA attention (Attention.attend), in float32:
forward and gradients, packed segments, padding, grouped-query heads. On CPU the kernels run in Pallas interpret
mode, the same kernel code a TPU / GPU compiles."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.model import attention
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import Attention, attention_mask, rotary_tables

T = 256  # Two 128-token blocks: the kernels skip, mask and combine blocks.


def _config(**overrides) -> ModelConfig:
  return ModelConfig(**{**preset_fields("tiny"), "vocab_size": 50, "hidden_size": 64, "num_heads": 4,
                        "num_kv_heads": 2, "head_dim": 64, "dtype": "float32", "attention_block_q": 128,
                        "attention_block_kv": 128, **overrides})


def _packed_rows():
  """Row 0: three packed sequences (positions restart); row 1: one sequence then padding (segment 0)."""
  segments = np.ones((2, T), np.int32)
  segments[0, 100:180], segments[0, 180:] = 2, 3
  segments[1, 200:] = 0
  positions = np.stack([np.concatenate([np.arange(100), np.arange(80), np.arange(T - 180)]), np.arange(T)])
  return jnp.asarray(segments), jnp.asarray(positions)


def _loss_and_grads(config: ModelConfig, impl: str):
  """A weighted sum of one attention sublayer's outputs at real tokens, and its gradients in params and input."""
  graphdef, params = nnx.split(Attention(config, nnx.Rngs(0)))
  segments, positions = _packed_rows()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, T, config.hidden_size)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32) * (segments != 0)[..., None]
  rope = rotary_tables(positions, config.head_dim, config.rope_theta)

  def loss(params, x):
    mask = attention_mask(segments) if impl == "xla" else None
    return jnp.sum(nnx.merge(graphdef, params)(x, rope, mask, segments, impl) * weights)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def _assert_close(reference, kernel):
  for want, got in zip(jax.tree.leaves(reference), jax.tree.leaves(kernel)):
    want, got = np.asarray(want), np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize("impl, mesh_shape", [
    # Splash on one device (grouped-query heads in the kernel) is the model test's below: the same 4 / 2 heads, packed
    # rows and 128-token blocks, its gradients through every attention parameter.
    # Heads over tensor = 4: the 2 kv heads do not divide, so each query head gets its own copy (per-shard GQA).
    ("splash", (2, 1, 4)),
    ("pallas_gpu", None),
])
def test_kernel_matches_xla_attention_forward_and_gradients(impl, mesh_shape):
  config = _config()
  reference = _loss_and_grads(config, "xla")
  if mesh_shape is None:
    kernel = _loss_and_grads(config, impl)
  else:
    with jax.set_mesh(sharding.make_mesh(*mesh_shape)):
      kernel = _loss_and_grads(config, impl)
  _assert_close(reference, kernel)


def test_auto_picks_the_kernel_of_the_platform_and_falls_back_where_blocks_do_not_divide():
  assert sharding.target_platform() == "cpu"
  assert attention.implementation(_config(), T) == "xla"  # auto on CPU.
  assert attention.implementation(_config(attention="splash"), T) == "splash"
  assert attention.implementation(_config(attention="splash"), 200) == "xla"  # 128-token blocks do not divide 200.
  assert attention.implementation(_config(attention="splash"), 64) == "xla"  # A block under 128 tokens.
  assert attention.implementation(_config(attention="pallas_gpu"), 64) == "pallas_gpu"  # Blocks shrink to short rows.
  with pytest.raises(ValueError, match="model.attention must be one of"):
    _config(attention="flash")
  with pytest.raises(ValueError, match="model.attention_block_q must be a positive multiple of 128"):
    _config(attention_block_q=100)


@pytest.mark.slow
def test_model_with_splash_matches_xla_through_the_layer_scan_and_remat():
  """The kernel inside the scanned, rematerialised layers: same value logits at real tokens and same gradients."""
  from lenvm_jax.model.transformer import LengthValueModel
  segments, positions = _packed_rows()
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, 50, (2, T)), jnp.int32)

  def loss_and_grads(impl):
    graphdef, params = nnx.split(LengthValueModel(_config(attention=impl, remat="full"), nnx.Rngs(0)))
    loss = lambda p: jnp.sum(jnp.where(segments != 0, nnx.merge(graphdef, p)(tokens, positions, segments), 0.0))
    return jax.jit(jax.value_and_grad(loss))(params)

  _assert_close(loss_and_grads("xla"), loss_and_grads("splash"))


def test_a_splash_kernel_first_built_inside_a_trace_serves_later_traces():
  """The mask is cached across calls, the kernel is built per trace: a kernel cached from inside one jit held that
  trace's tracers (in a full test run another test's jit built it first and a later one failed with
  UnexpectedTracerError); one built eagerly placed its arrays on a backend an AOT compile for a TPU has not
  (tests/test_compile_check.py compiles it for one)."""
  attention._splash_mask.cache_clear()
  q = jax.random.normal(jax.random.key(0), (1, 128, 2, 8))
  segments = jnp.ones((1, 128), jnp.int32)
  loss = lambda q: attention.splash_attention(q, q, q, segments, block_q=128, block_kv=128, interpret=True).sum()
  first = jax.jit(loss)(q)
  grad = jax.jit(jax.grad(loss))(q)  # A new trace reusing the cached kernel.
  np.testing.assert_allclose(float(first), float(loss(q)), rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_the_gpu_kernel_path_lowers_for_cuda_without_a_gpu(monkeypatch):
  """The whole model's value-and-gradient with attention="pallas_gpu", scanned and rematerialised layers, lowered
  for CUDA on this CPU-only host: Pallas emits the Triton kernels (forward, and the backward's) as it would on a GPU,
  not in interpret mode. What needs a GPU (Triton to PTX) is left to experiments/device_check.py. The platform is
  CUDA's because the lowering targets it; the model asks sharding.target_platform, which follows the devices."""
  from jax import export
  from lenvm_jax.model.transformer import LengthValueModel
  monkeypatch.setattr(sharding, "target_platform", lambda: "gpu")
  config = _config(attention="pallas_gpu", remat="full", dtype="bfloat16")
  graphdef, params = nnx.split(LengthValueModel(config, nnx.Rngs(0)))
  segments, positions = _packed_rows()
  loss = lambda p, tokens: jnp.sum(jnp.where(segments != 0, nnx.merge(graphdef, p)(tokens, positions, segments), 0.0))
  triton = "__gpu$xla.gpu.triton"
  lowered = export.export(jax.jit(jax.value_and_grad(loss)), platforms=["cuda"],
                          disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
      params, jax.ShapeDtypeStruct((2, T), jnp.int32))
  text = lowered.mlir_module()
  kernels = set(re.findall(r'name = "(mha_[a-z_]+)"', text))
  assert text.count(f"@{triton}") >= 2 and "mha_forward" in kernels and kernels - {"mha_forward"}, kernels
