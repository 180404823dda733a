"""Checkpoints written before the decoder layers were stacked still restore.

Such a checkpoint holds `layers` as one subtree per layer ({"0": {...}, "1": {...}, ...}) in the params and in every
tree shaped like them (the EMA, Adam's moments); the model now holds one subtree of [layers, ...] arrays
(model/transformer.py). A restore asks `per_layer_target` for a target in the stored layout (each stacked array's
struct split into one per layer, same sharding without the layers axis), restores into it, and `stack_layers` stacks
what it read on the devices. Restores of stacked checkpoints pass through both unchanged.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lenvm_jax.model.transformer import LAYERS_AXIS


def _is_per_layer(layers) -> bool:
  keys = list(layers.keys()) if hasattr(layers, "keys") else []
  return bool(keys) and all(str(k).isdigit() for k in keys)


def stored_per_layer(stored_params) -> bool:
  """Whether a checkpoint's stored params tree (orbax metadata) keeps one subtree per decoder layer."""
  return LAYERS_AXIS in stored_params and _is_per_layer(stored_params[LAYERS_AXIS])


def _holds_layers(node) -> bool:
  return isinstance(node, dict) and LAYERS_AXIS in node


def _unstacked_struct(struct: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  sharding = getattr(struct, "sharding", None)
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  return jax.ShapeDtypeStruct(struct.shape[1:], struct.dtype, sharding=sharding)


def per_layer_target(target):
  """`target` (ShapeDtypeStructs of the stacked layout) with every `layers` subtree split into "0", "1", ..."""

  def split(node):
    if not _holds_layers(node) or _is_per_layer(node[LAYERS_AXIS]):
      return node
    layers = node[LAYERS_AXIS]
    count = jax.tree.leaves(layers)[0].shape[0]
    one_layer = jax.tree.map(_unstacked_struct, layers)
    return {**node, LAYERS_AXIS: {str(i): one_layer for i in range(count)}}

  return jax.tree.map(split, target, is_leaf=_holds_layers)


def _stack(*arrays):
  sharding = arrays[0].sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(None, *tuple(sharding.spec)))
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*arrays)
  return jnp.stack(arrays)


def stack_layers(tree):
  """A restored tree with every per-layer `layers` subtree stacked into [layers, ...] arrays (on the devices)."""

  def stack(node):
    if not _holds_layers(node) or not _is_per_layer(node[LAYERS_AXIS]):
      return node
    layers = node[LAYERS_AXIS]
    ordered = [layers[k] for k in sorted(layers, key=int)]
    return {**node, LAYERS_AXIS: jax.tree.map(_stack, *ordered)}

  return jax.tree.map(stack, tree, is_leaf=_holds_layers)
