"""The train state (a plain pytree) and its sharded initialisation on the mesh.

Parameters live as a pure nested dict (what orbax, optax and HF conversion all want); the NNX module is rebuilt
from `graphdef` + params inside jit, which costs nothing at run time.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lenvm_jax import sharding
from lenvm_jax.model_config import ModelConfig
from lenvm_jax.model.transformer import abstract_model, init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  rng: jax.Array  # Raw key data; split once per step for stochastic features (restored on resume).
  nonfinite_skips: jax.Array  # Steps whose update was skipped for a non-finite loss or gradient.
  # train.ema_decay > 0: an exponential moving average of params, which eval, prediction and export use; else None.
  ema_params: dict | None = None


def eval_params(state: TrainState) -> dict:
  """The weights a run is evaluated, served and exported with: the EMA when the run keeps one."""
  return state.params if state.ema_params is None else state.ema_params


def checkpoint_target(abstract_state: TrainState, stored) -> dict:
  """The restore target for a checkpoint whose state tree is `stored` (its metadata): the fields it holds, from
  `abstract_state`; a stored EMA is shaped like params and restored even if the run keeps none (orbax restores whole
  trees), then dropped by from_checkpoint."""
  target = {name: getattr(abstract_state, name) for name in stored if name != "ema_params"}
  if "ema_params" in stored:
    target["ema_params"] = None if stored["ema_params"] is None else abstract_state.params
  return target


def from_checkpoint(abstract_state: TrainState, restored: dict) -> TrainState:
  """The restored fields as a TrainState whose EMA follows the run, not the checkpoint: kept if the run keeps one,
  started at the restored weights if the checkpoint had none (EMA turned on at resume), dropped if the run keeps
  none."""
  restored = dict(restored)
  ema = restored.pop("ema_params", None)
  if abstract_state.ema_params is None:
    ema = None
  elif ema is None:
    ema = jax.tree.map(jnp.copy, restored["params"])
  return TrainState(**restored, ema_params=ema)


def create_train_state(model_config: ModelConfig, tx, mesh, seed: int, initialize: bool = True,
                       initial_params: dict | None = None, ema: bool = False):
  """The state initialised directly into its sharding (no full host copy), or, with `initialize=False`, only its
  ShapeDtypeStructs with shardings (the target of a checkpoint restore). Returns (state, shardings).
  `ema` adds ema_params, starting equal to params.

  `initial_params` (already sharded, e.g. from hf_import.load_params) replace the random init; they are donated.
  """
  _, abstract = abstract_model(model_config)
  param_sh = sharding.param_shardings(abstract, mesh)

  def init(given=None):
    params = init_params(model_config, seed) if given is None else given
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)), nonfinite_skips=jnp.zeros((), jnp.int32),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)

  state_shape = jax.eval_shape(init)
  state_sh = state_shardings(state_shape, param_sh, mesh)
  if not initialize:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shape, state_sh), state_sh
  if initial_params is not None:
    return jax.jit(init, out_shardings=state_sh, donate_argnums=0)(initial_params), state_sh
  return jax.jit(init, out_shardings=state_sh)(), state_sh


def shape_structs(tree):
  """ShapeDtypeStructs (with shardings) of a tree of arrays, for ahead-of-time lowering."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def state_shardings(state_shape: TrainState, param_sh: dict, mesh) -> TrainState:
  """Optimizer moments shard like their parameters; scalars and counters are replicated."""
  replicated = NamedSharding(mesh, P())
  flat_params = {path: s for path, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

  def opt_leaf(path, leaf):
    # optax states embed the params tree: match on the trailing path that equals a parameter path.
    for start in range(len(path)):
      if tuple(path[start:]) in flat_params and len(leaf.shape) > 0:
        return flat_params[tuple(path[start:])]
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state_shape.opt_state)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated, nonfinite_skips=replicated,
                    ema_params=None if state_shape.ema_params is None else param_sh)
