"""Load a llama.cpp GGUF file (Llama / Qwen2 / Qwen3 architecture) as LengthValueModel params, so that a quantized
checkpoint can start a run or serve as a policy like a Hugging Face directory.

Every tensor is dequantized to float32 with `gguf` (numpy), brought to the Hugging Face [out, in] layout and then
placed through the same mappings and shardings as hf_import (model/placement.py), one tensor at a time. Two GGUF
conventions are undone:
llama.cpp names its tensors differently (token_embd, blk.N.attn_q, ...), and for the `llama` architecture its
converter interleaves the two RoPE halves of every q/k head's rows (llama.cpp rotates adjacent pairs; HF and we
rotate the halves), which `unpermute_rope_rows` reverses. Qwen2 / Qwen3 use the halves layout in llama.cpp too and
are stored unpermuted. A GGUF holds no value head: it gets a fresh init.

The file's metadata reader is lenvm_jax/gguf_file.py; its tokenizer is rebuilt in data/tokenizer.py. Whatever the import cannot represent
(another architecture, MoE, RoPE scaling, partial rotary, an integer or unimplemented quantization type) is a
GGUFError naming the file and the field or tensor.
"""

import os

import numpy as np

from lenvm_jax.gguf_file import GGUFError, metadata, read_gguf, require_field
from lenvm_jax.model import hf_layout, placement
from lenvm_jax.model_config import ModelConfig

# general.architecture -> (q/k/v biases, q/k RMSNorm, q/k rows stored RoPE-interleaved by llama.cpp's converter).
ARCHITECTURES = {
    "llama": (False, False, True),
    "qwen2": (True, False, False),
    "qwen3": (False, True, False),
}

# HF tensor name (within a layer: after "model.layers.N.") -> llama.cpp's name (within "blk.N.").
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

def architecture(reader, path: str) -> str:
  name = require_field(reader, path, "general.architecture")
  if name not in ARCHITECTURES:
    raise GGUFError(f"{path}: general.architecture is {name!r}; supported: {sorted(ARCHITECTURES)}")
  return name


def _tensors(reader) -> dict:
  return {t.name: t for t in reader.tensors}


def _int_field(reader, path: str, key: str, default=None) -> int:
  value = metadata(reader, key, default)
  if value is None:
    raise GGUFError(f"{path}: metadata field {key} is missing")
  if not isinstance(value, int) or isinstance(value, bool):  # An array: per-layer sizes, which we cannot hold.
    raise GGUFError(f"{path}: metadata field {key} is {value!r:.60}; a single integer is supported")
  return value


def _float32_value(value) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06), so it
  equals the value a run config or HF config.json writes."""
  return float(str(np.float32(value)))


def model_config_from_gguf(reader, path: str, **run_fields) -> ModelConfig:
  """ModelConfig of the file's metadata; `run_fields` sets the non-architecture fields (dtype, remat, dropout)."""
  arch = architecture(reader, path)
  qkv_bias, qk_norm, _ = ARCHITECTURES[arch]
  if (experts := metadata(reader, f"{arch}.expert_count", 0)):
    raise GGUFError(f"{path}: {arch}.expert_count is {experts}; mixture-of-experts models are not supported")
  scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise GGUFError(f"{path}: {arch}.rope.scaling.type is {scaling!r}; only plain RoPE is supported")
  hidden = _int_field(reader, path, f"{arch}.embedding_length")
  num_heads = _int_field(reader, path, f"{arch}.attention.head_count")
  num_kv_heads = _int_field(reader, path, f"{arch}.attention.head_count_kv", num_heads)
  head_dim = _int_field(reader, path, f"{arch}.attention.key_length", hidden // num_heads)
  for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
    if _int_field(reader, path, key, head_dim) != head_dim:  # Separate v size / partial rotary: not our trunk.
      raise GGUFError(f"{path}: {key} is {metadata(reader, key)} but the head size is {head_dim}; "
                      "only equal key / value / rotary sizes are supported")
  tensors = _tensors(reader)
  if "token_embd.weight" not in tensors:
    raise GGUFError(f"{path}: tensor token_embd.weight is missing")
  try:
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml order [hidden, rows]: the embedding rows.
        hidden_size=hidden, num_layers=_int_field(reader, path, f"{arch}.block_count"), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim,
        mlp_dim=_int_field(reader, path, f"{arch}.feed_forward_length"),
        rope_theta=_float32_value(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32_value(require_field(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors, qkv_bias=qkv_bias, qk_norm=qk_norm, **run_fields)
  except ValueError as e:
    raise GGUFError(f"{path}: {e}") from None


def load_model_config(path: str, **run_fields) -> ModelConfig:
  return model_config_from_gguf(read_gguf(path), os.fspath(path), **run_fields)


def gguf_tensor_name(hf_name: str) -> str:
  """llama.cpp's name of an HF trunk tensor, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
  if hf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """HF -> llama.cpp: within each head, row i of the first half and row i of the second half become adjacent
  (the pairs llama.cpp rotates). What its converter does to Llama q/k weights; here to write test files."""
  rows = weight.shape[0]
  halves = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
  return np.ascontiguousarray(halves.swapaxes(1, 2)).reshape(weight.shape)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp -> HF: the inverse of permute_rope_rows (interleaved pairs back to the two RoPE halves per head)."""
  rows = weight.shape[0]
  pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
  return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(weight.shape)


def dequantize(tensor, path: str) -> np.ndarray:
  """A GGUF tensor as float32 in numpy order ([out, in] for a Linear weight: the HF layout)."""
  import gguf
  kind = tensor.tensor_type
  if kind.name in ("I8", "I16", "I32", "I64"):
    raise GGUFError(f"{path}: tensor {tensor.name} has type {kind.name}; integer tensors are not weights we can load")
  try:
    array = gguf.quants.dequantize(tensor.data, kind)
  except NotImplementedError:
    raise GGUFError(f"{path}: tensor {tensor.name} has quantization type {kind.name}, which gguf "
                    f"{_gguf_version()} cannot dequantize") from None
  shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dims innermost first.
  return np.asarray(array, np.float32).reshape(shape)


def _gguf_version() -> str:
  from importlib import metadata as package_metadata
  try:
    return package_metadata.version("gguf")
  except package_metadata.PackageNotFoundError:
    return "(unknown version)"


def hf_layout_tensor(reader, path: str, mapping: hf_layout.TensorMapping, model_config: ModelConfig) -> np.ndarray:
  """The tensor of `mapping` as the HF checkpoint holds it: dequantized, q/k RoPE rows un-interleaved for Llama."""
  name = gguf_tensor_name(mapping.hf_name)
  tensor = _tensors(reader).get(name)
  if tensor is None:
    raise GGUFError(f"{path}: tensor {name} (for {mapping.hf_name}) is missing")
  array = dequantize(tensor, path)
  if tuple(array.shape) != mapping.hf_shape:
    raise GGUFError(f"{path}: tensor {name} has shape {tuple(array.shape)}, expected {mapping.hf_shape}")
  if ARCHITECTURES[architecture(reader, path)][2]:
    for part, heads in ((".attn_q.", model_config.num_heads), (".attn_k.", model_config.num_kv_heads)):
      if part in name:
        array = unpermute_rope_rows(array, heads)
  return array


def load_params(path: str, model_config: ModelConfig, mesh, seed: int = 0) -> dict:
  """Params pure dict of `model_config`'s model from the GGUF file, sharded on `mesh` as hf_import shards them.

  Tensors the model has no place for (e.g. rope_freqs of Llama 3.1 scaling, MoE experts) are an error; the value
  head is a fresh init from `seed`.
  """
  path = os.fspath(path)
  reader = read_gguf(path)
  mappings = hf_layout.trunk_mappings(model_config)
  unexpected = sorted(set(_tensors(reader)) - {gguf_tensor_name(m.hf_name) for m in mappings})
  if unexpected:
    raise GGUFError(f"{path}: tensors with no place in the model: {unexpected[:8]}"
                    f"{' ...' if len(unexpected) > 8 else ''}")
  abstract, shardings = placement.abstract_params(model_config, mesh)
  params: dict = {}
  for m in mappings:
    placement.put_mapped(params, m, hf_layout_tensor(reader, path, m, model_config), abstract, shardings)
  params["value_head"] = placement.fresh_value_head(model_config, shardings, seed)
  if model_config.candidate_head != "none":
    params["candidate_head"] = placement.fresh_candidate_head(model_config, shardings, seed)
  return params
