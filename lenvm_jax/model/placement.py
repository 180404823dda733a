"""Params placed on a mesh as they are read: the abstract tree and its shardings, one HF-layout host tensor at a time
into its place (a decoder layer's into its slice of the stacked array, on the devices), and freshly initialised
heads for what a checkpoint lacks.

The one placing path of both imports, HF safetensors (hf_import.py) and llama.cpp GGUF (gguf_import.py), so the host
holds at most one full tensor, never a second copy of the model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lenvm_jax import sharding
from lenvm_jax.model import hf_layout
from lenvm_jax.model.candidate_head import CandidateValueHead
from lenvm_jax.model.transformer import LengthValueModel, ValueHead
from lenvm_jax.model_config import ModelConfig


def abstract_params(model_config: ModelConfig, mesh) -> tuple[dict, dict]:
  """(abstract params pure dict, matching shardings on `mesh` by logical axes), nothing allocated."""
  _, abstract_state = nnx.split(nnx.eval_shape(lambda: LengthValueModel(model_config, nnx.Rngs(0))))
  return abstract_state.to_pure_dict(), sharding.param_shardings(abstract_state, mesh)


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


def fresh_value_head(model_config: ModelConfig, shardings: dict, seed: int) -> dict:
  """A newly initialised value head (from `seed`), created directly on its shardings."""
  fresh = lambda: nnx.split(ValueHead(model_config.hidden_size, nnx.Rngs(seed)))[1].to_pure_dict()
  return jax.jit(fresh, out_shardings=shardings["value_head"])()


def fresh_candidate_head(model_config: ModelConfig, shardings: dict, seed: int) -> dict:
  """A newly initialised candidate head (from `seed`), created directly on its shardings."""
  fresh = lambda: nnx.split(CandidateValueHead(model_config.hidden_size, model_config.vocab_size,
                                               model_config.candidate_head == "tied", nnx.Rngs(seed)))[1]
  return jax.jit(lambda: fresh().to_pure_dict(), out_shardings=shardings["candidate_head"])()
