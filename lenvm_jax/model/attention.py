"""Causal self-attention over packed rows (segment ids), one kernel per backend behind `self_attention`.

  TPU: the Pallas splash attention kernel (jax.experimental.pallas.ops.tpu.splash_attention): causal mask and
       segment ids inside the kernel, fully masked blocks skipped, block sizes from model.attention_block_q / _kv.
  GPU: the Pallas GPU (Triton) flash attention kernel (jax.experimental.pallas.ops.gpu.attention.mha), which takes
       segment ids: cuDNN through jax.nn.dot_product_attention knows one sequence per row (seq lengths), so packed
       rows would need a [T, T] mask or bias in HBM. GQA key / value heads are repeated to the query heads first.
  CPU: the blocked XLA attention of model/transformer.py (Attention.attend), which builds the [T, T] mask.

Neither kernel writes a [T, T] array to HBM. Within a packed row a token sees the earlier tokens of its own segment;
padding (segment 0) sees only padding, so no softmax row is empty; what padding computes is never read (no real
token attends to it, and every loss masks it). Under a mesh the kernels run per shard (jax.shard_map): batch over
(data, fsdp), heads over tensor, as the logical rules of lenvm_jax/sharding.py place them.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lenvm_jax import sharding
from lenvm_jax.model_config import ModelConfig

_reported: set = set()


def _blocks_fit(seq_len: int, blocks) -> bool:
  """Each block (shrunk to a shorter row) divides the row and is a multiple of 128 tokens (TPU lanes)."""
  return all(seq_len % min(b, seq_len) == 0 and min(b, seq_len) % 128 == 0 for b in blocks)


def implementation(config: ModelConfig, seq_len: int) -> str:
  """The kernel self-attention runs with: model.attention, with "auto" by the platform compiled for. A kernel that
  cannot take this length falls back to "xla", reported once: splash needs blocks that divide the row (multiples
  of 128), the GPU kernel rows that its 128-token query blocks divide (or shorter)."""
  chosen = config.attention
  if chosen == "auto":
    chosen = {"tpu": "splash", "gpu": "pallas_gpu"}.get(sharding.target_platform(), "xla")
  if chosen == "splash":
    fits = _blocks_fit(seq_len, (config.attention_block_q, config.attention_block_kv))
  else:
    fits = chosen != "pallas_gpu" or seq_len % min(128, seq_len) == 0
  if not fits:
    if (chosen, seq_len) not in _reported:
      _reported.add((chosen, seq_len))
      logging.warning("attention: %s cannot take rows of %d tokens (block sizes); using xla", chosen, seq_len)
    return "xla"
  return chosen


def _scaled(q):
  return q * (q.shape[-1] ** -0.5)


@functools.lru_cache(maxsize=32)
def _splash_mask(seq_len: int, heads: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  return mask_lib.MultiHeadMask([mask_lib.CausalMask((seq_len, seq_len)) for _ in range(heads)])


def _splash_kernel(seq_len: int, heads: int, block_q: int, block_kv: int, interpret: bool):
  """A splash kernel for this row length and head count, built inside the caller's trace.

  The kernel holds its mask's block layout as arrays (jnp.array of numpy tables), so it is built per trace and never
  cached: built once under jax.ensure_compile_time_eval and reused, its arrays were placed on the default backend,
  which an ahead-of-time compile for a TPU topology does not have ('Executable' object has no attribute
  'local_devices'); cached without it, a later trace would see this trace's tracers. Staged here, they are constants
  of the program being compiled, whatever its devices. The costly part, the mask's block tables, is cached by the
  kernel library itself (splash_attention_mask_info._process_mask), keyed by the mask built once in _splash_mask.
  """
  # Imported here: the TPU kernel modules are only needed where they run.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  block_q, block_kv = min(block_q, seq_len), min(block_kv, seq_len)
  blocks = kernel_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                 block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                 block_q_dq=block_q, block_kv_dq=block_kv)
  kernel = kernel_lib.make_splash_mha(_splash_mask(seq_len, heads), block_sizes=blocks, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)
  return kernel, kernel_lib.SegmentIds


def splash_attention(q, k, v, segment_ids, *, block_q: int, block_kv: int, interpret: bool = False):
  """q [B, T, heads, D], k / v [B, T, kv_heads, D] (heads a multiple of kv_heads), segment_ids [B, T] -> [B, T,
  heads, D]. The splash kernel takes grouped kv heads as they are."""
  t, heads = q.shape[1], q.shape[2]
  kernel, segments = _splash_kernel(t, heads, block_q, block_kv, interpret)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)
  one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=segments(q=s, kv=s))
  out = jax.vmap(one_row)(heads_major(_scaled(q)), heads_major(k), heads_major(v), segment_ids)
  return heads_major(out)


def pallas_gpu_attention(q, k, v, segment_ids, *, interpret: bool = False):
  """As splash_attention, with the Pallas GPU flash kernel (kv heads repeated to the query heads)."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # Needs Triton where it runs.
  group = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
  return gpu_attention.mha(q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret)


def _per_shard(kernel, q, k, v, segment_ids):
  """Runs `kernel` on each device's shard of the batch and heads (a Pallas call is not partitioned by XLA)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, segment_ids)
  q_spec = sharding.logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
  kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # kv heads the tensor axis does not divide: give each query head its own.
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    kv_spec = q_spec
  segment_spec = P(q_spec[0], None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids)


# The platform each Pallas kernel is written for; elsewhere it runs in interpret mode.
KERNEL_PLATFORMS = {"splash": "tpu", "pallas_gpu": "gpu"}


def self_attention(q, k, v, segment_ids, config: ModelConfig, impl: str):
  """Attention output [B, T, heads, D] (before the output projection) by a Pallas kernel ("splash" or
  "pallas_gpu"; "xla" is Attention.attend). Off its platform the kernel runs in interpret mode (CPU tests)."""
  if impl not in KERNEL_PLATFORMS:
    raise ValueError(f"self_attention runs a kernel {sorted(KERNEL_PLATFORMS)}, not {impl!r}")
  interpret = sharding.target_platform() != KERNEL_PLATFORMS[impl]
  if impl == "splash":
    kernel = functools.partial(splash_attention, block_q=config.attention_block_q, block_kv=config.attention_block_kv,
                               interpret=interpret)
  else:
    kernel = functools.partial(pallas_gpu_attention, interpret=interpret)
  return _per_shard(kernel, q, k, v, segment_ids.astype(np.int32))
