"""Device mesh and the logical-axis rules that place every parameter and activation on it.

Parameters name their dimensions with logical axes (`embed`, `mlp`, `heads`, ...). RULES maps each logical axis to
mesh axes; changing a rule re-shards the model with no change to model code. A mesh axis that does not divide a
dimension is dropped for that array (replicated) and reported once, so the tiny test model runs on any mesh.
"""

import logging
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple shards over several). Parameters: FSDP over `embed`, tensor parallel over
# heads / mlp / vocab. Activations: batch over data x fsdp.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ()),
    # The stacked decoder layers' leading axis (and the KV cache's): every device holds its shard of every layer.
    ("layers", ()),
    ("embed", ("fsdp",)),
    # The embedding table's embed dim while rows are looked up: gathered, as FSDP gathers every weight it uses. Left
    # on fsdp (the tokens' batch axis too), XLA replicates the lookup's output ("involuntary full rematerialization").
    ("embed_lookup", ()),
    ("vocab", ("tensor",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("norm", ()),
    ("value_hidden", ("tensor",)),
    ("value_out", ()),
)

_reported_drops: set = set()


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh (data, fsdp, tensor) over all devices; one size may be -1 to take the devices that remain."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  fields = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), shape))
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1, got {fields}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive or -1, got {fields}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh {fields} cannot fill {len(devices)} devices: {len(devices)} is not a multiple of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices):
    raise ValueError(
        f"mesh {fields} needs {math.prod(shape)} devices but only {len(devices)} are available "
        f"({jax.default_backend()}); make the product of the sizes at most {len(devices)}, or set one to -1")
  if math.prod(shape) < len(devices):
    logging.warning("mesh %s uses %d of %d devices", fields, math.prod(shape), len(devices))
    devices = devices[:math.prod(shape)]
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=RULES) -> P:
  """PartitionSpec for an array whose dims carry `logical_axes`; drops mesh axes that do not divide `shape`."""
  table = dict(rules)
  spec = []
  used: set = set()
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to lenvm_jax.sharding.RULES")
    axes = tuple(a for a in table[name] if a not in used)
    if mesh is not None and shape is not None:
      size = math.prod(mesh.shape[a] for a in axes)
      if size > 1 and shape[dim] % size:
        key = (tuple(logical_axes), tuple(shape))
        if key not in _reported_drops:
          _reported_drops.add(key)
          logging.warning("replicating dim %d (%s, size %d) of a %s array: mesh axes %s (size %d) do not divide it",
                          dim, name, shape[dim], tuple(shape), axes, size)
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh):
  """Pure-dict tree of NamedShardings for a model state whose Variables carry `logical_axes` metadata."""

  def one(variable):
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      raise ValueError(f"parameter of shape {variable.value.shape} has no logical_axes metadata")
    return NamedSharding(mesh, logical_to_spec(axes, variable.value.shape, mesh))

  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(shardings).to_pure_dict() if not isinstance(shardings, dict) else shardings


def target_platform() -> str:
  """The platform being compiled for: that of the current mesh's devices (a TPU topology's even on a CPU host, see
  experiments/compile_check.py), else JAX's default backend. "cpu", "gpu" or "tpu"."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under the current mesh (`jax.set_mesh`); a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Sharding of a batch array: dim `leading` (the example dim) over data x fsdp, the rest replicated."""
  spec = [None] * ndim
  spec[leading] = logical_to_spec(("batch",))[0]
  return NamedSharding(mesh, P(*spec))


def batch_shardings(mesh: Mesh, example: dict, leading: int = 0) -> dict:
  """A batch_sharding for each array of a batch dict (by its rank)."""
  return {k: batch_sharding(mesh, v.ndim, leading) for k, v in example.items()}
