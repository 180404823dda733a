"""Load a Hugging Face causal-LM directory (Llama / Qwen2 / Qwen3) into LengthValueModel params on a mesh.

Tensors are read one at a time (safetensors `safe_open`, numpy) and each is placed straight onto its sharding (a
decoder layer's into its slice of the stacked array, on the devices), so the host holds at most one full tensor,
never a second copy of the model. A `value_head.safetensors` (a LenVM in
the reference layout, spec section 6) supplies the value head; without one it gets a fresh init. Every function
that takes a directory also takes a llama.cpp `.gguf` file (model/gguf_import.py).
"""

import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy, so bf16 checkpoints read through safetensors.numpy.
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from lenvm_jax import sharding
from lenvm_jax.data import gguf_file
from lenvm_jax.model import gguf_import, hf_config, hf_layout
from lenvm_jax.model.candidate_head import CandidateValueHead
from lenvm_jax.model.config import ModelConfig
from lenvm_jax.model.transformer import LengthValueModel, ValueHead

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_files(directory: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file that holds it (single file, or sharded files + index)."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_path}: no 'weight_map' object")
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors weights "
                          "are supported)")


def place(array: np.ndarray, target) -> jax.Array:
  """One host array onto its sharding: each device takes its slice (works across processes too)."""
  return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer: jax.Array, index) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, axis=0)


def put_mapped(params: dict, mapping: hf_layout.TensorMapping, hf_tensor: np.ndarray, abstract: dict,
               shardings: dict):
  """Places one HF-layout host tensor into `params` (a pure dict being filled) at its mapping's place.

  A decoder layer's tensor goes into its slice of the stacked array, written on the devices (the stacked array is
  created there, zeros, at the layer's first tensor), so the host still holds one layer's tensor at a time.
  """
  target, target_sharding = hf_layout.get_path(abstract, mapping.path), hf_layout.get_path(shardings, mapping.path)
  ours = mapping.to_ours(np.asarray(hf_tensor, dtype=target.dtype), hf_layout.param_shape(abstract, mapping))
  if mapping.layer is None:
    hf_layout.set_path(params, mapping.path, place(ours, target_sharding))
    return
  try:
    stacked = hf_layout.get_path(params, mapping.path)
  except KeyError:
    stacked = jax.jit(lambda: jnp.zeros(target.shape, target.dtype), out_shardings=target_sharding)()
  layer_sharding = NamedSharding(target_sharding.mesh, P(*target_sharding.spec[1:]))
  hf_layout.set_path(params, mapping.path, _write_layer(stacked, place(ours, layer_sharding), mapping.layer))


def _load_mapped(mappings, files: dict[str, str], abstract: dict, shardings: dict) -> dict:
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {}
    for m in mappings:
      if m.hf_name not in files:
        raise KeyError(f"tensor {m.hf_name!r} not found in {sorted(set(files.values()))}")
      path = files[m.hf_name]
      if path not in handles:
        handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
      tensor = handles[path].get_tensor(m.hf_name)
      if tuple(tensor.shape) != m.hf_shape:
        raise ValueError(f"{path}: tensor {m.hf_name} has shape {tuple(tensor.shape)}, expected {m.hf_shape}")
      put_mapped(params, m, tensor, abstract, shardings)
      del tensor
  return params


def _ignorable(name: str, model_config: ModelConfig) -> bool:
  """Tensors some checkpoints carry that hold nothing we need: RoPE tables, a tied LM head's duplicate."""
  return name.endswith("rotary_emb.inv_freq") or (model_config.tie_embeddings and name == "lm_head.weight")


def has_value_head(directory: str) -> bool:
  if gguf_file.is_gguf_path(directory):  # A GGUF file is a plain LM: never a value head.
    return False
  return os.path.isfile(os.path.join(directory, hf_layout.VALUE_HEAD_FILE))


def abstract_params(model_config: ModelConfig, mesh) -> tuple[dict, dict]:
  """(abstract params pure dict, matching shardings on `mesh` by logical axes), nothing allocated."""
  _, abstract_state = nnx.split(nnx.eval_shape(lambda: LengthValueModel(model_config, nnx.Rngs(0))))
  return abstract_state.to_pure_dict(), sharding.param_shardings(abstract_state, mesh)


def fresh_value_head(model_config: ModelConfig, shardings: dict, seed: int) -> dict:
  """A newly initialised value head (from `seed`), created directly on its shardings."""
  fresh = lambda: nnx.split(ValueHead(model_config.hidden_size, nnx.Rngs(seed)))[1].to_pure_dict()
  return jax.jit(fresh, out_shardings=shardings["value_head"])()


def candidate_head_kind(directory: str) -> str:
  """The candidate head an HF dir carries ("table" / "tied", from candidate_head.safetensors), or "none"."""
  path = os.path.join(directory, hf_layout.CANDIDATE_HEAD_FILE)
  if gguf_file.is_gguf_path(directory) or not os.path.isfile(path):
    return "none"
  with safe_open(path, framework="numpy") as f:
    kind = (f.metadata() or {}).get("candidate_head")
    return kind or ("table" if "c_head.table.weight" in f.keys() else "tied")


def fresh_candidate_head(model_config: ModelConfig, shardings: dict, seed: int) -> dict:
  """A newly initialised candidate head (from `seed`), created directly on its shardings."""
  fresh = lambda: nnx.split(CandidateValueHead(model_config.hidden_size, model_config.vocab_size,
                                               model_config.candidate_head == "tied", nnx.Rngs(seed)))[1]
  return jax.jit(lambda: fresh().to_pure_dict(), out_shardings=shardings["candidate_head"])()


def load_candidate_head(directory: str, model_config: ModelConfig, abstract: dict, shardings: dict, seed: int):
  """The model's candidate head from candidate_head.safetensors (exactly its tensors), else a fresh init."""
  path = os.path.join(directory, hf_layout.CANDIDATE_HEAD_FILE)
  if candidate_head_kind(directory) == "none":
    return fresh_candidate_head(model_config, shardings, seed)
  mappings = hf_layout.candidate_head_mappings(model_config)
  with safe_open(path, framework="numpy") as f:
    names = set(f.keys())
  if names != {m.hf_name for m in mappings}:
    raise ValueError(f"{path}: holds {sorted(names)}, expected exactly {sorted(m.hf_name for m in mappings)} for "
                     f"model.candidate_head={model_config.candidate_head!r}")
  return _load_mapped(mappings, {n: path for n in names}, abstract, shardings)["candidate_head"]


def load_params(directory: str, model_config: ModelConfig, mesh, seed: int = 0) -> dict:
  """Params pure dict of `model_config`'s model from the HF dir, every leaf sharded on `mesh` by its logical axes.

  Tensors the model has no place for are an error (an unsupported feature such as an o_proj bias would otherwise
  be dropped silently). Without value_head.safetensors the value head is a fresh init from `seed`.
  A `.gguf` file instead of a directory loads through gguf_import.
  """
  if gguf_file.is_gguf_path(directory):
    return gguf_import.load_params(directory, model_config, mesh, seed)
  abstract, shardings = abstract_params(model_config, mesh)

  files = tensor_files(directory)
  mappings = hf_layout.trunk_mappings(model_config)
  unexpected = sorted(set(files) - {m.hf_name for m in mappings} - {n for n in files if _ignorable(n, model_config)})
  if unexpected:
    raise ValueError(f"{directory}: tensors with no place in the model: {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}")
  params = _load_mapped(mappings, files, abstract, shardings)

  if has_value_head(directory):
    value_file = os.path.join(directory, hf_layout.VALUE_HEAD_FILE)
    value_maps = hf_layout.value_head_mappings(model_config)
    with safe_open(value_file, framework="numpy") as f:
      names = set(f.keys())
    expected = {m.hf_name for m in value_maps}
    if names != expected:
      raise ValueError(f"{value_file}: holds {sorted(names)}, expected exactly {sorted(expected)}")
    params.update(_load_mapped(value_maps, {n: value_file for n in names}, abstract, shardings))
  else:
    params["value_head"] = fresh_value_head(model_config, shardings, seed)
  if model_config.candidate_head != "none":
    params["candidate_head"] = load_candidate_head(directory, model_config, abstract, shardings, seed)
  return params


def load_model_config(directory: str, **run_fields) -> ModelConfig:
  """ModelConfig of an HF dir (or a `.gguf` file); `run_fields` sets dtype / remat / dropout."""
  if gguf_file.is_gguf_path(directory):
    return gguf_import.load_model_config(directory, **run_fields)
  run_fields.setdefault("candidate_head", candidate_head_kind(directory))  # An exported LenVM's own head.
  return hf_config.model_config_from_hf(hf_config.read_hf_config(directory),
                                        os.path.join(directory, "config.json"), **run_fields)
