"""The one program builder: a run config and a mesh -> objective, optimizer, train state and its shardings, and the
jitted / compiled train and eval steps. The trainer, experiments/bench.py and experiments/compile_check.py build
their steps here, so what they time or compile is what trains.

Call under `jax.set_mesh(mesh)` (the state is created into the mesh's shardings).
"""

import dataclasses

import jax
import optax

from lenvm_jax import sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.model import transformer
from lenvm_jax.train import optimizer, state as state_lib, step as step_lib
from lenvm_jax.value.objective import Objective


@dataclasses.dataclass(frozen=True)
class Program:
  """What a run's steps are made of; `state_shardings` is the train state's (params, moments, EMA)."""
  run: RunConfig
  mesh: jax.sharding.Mesh
  graphdef: object
  objective: Objective
  tx: optax.GradientTransformation
  state_shardings: object

  def fresh_state(self, initial_params: dict | None = None):
    """The initialised train state (random init, or `initial_params`, donated), in `state_shardings`."""
    state, _ = state_lib.create_train_state(self.run.model, self.tx, self.mesh, self.run.seed,
                                            initial_params=initial_params, ema=self.run.train.keeps_ema)
    return state

  def micro_batches(self, batch: dict) -> dict:
    """[B, T] -> [accum_steps, B / accum_steps, T]: how the train step takes a batch."""
    accum = self.run.train.accum_steps
    return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}

  def train_batch_shardings(self, micro_batches: dict) -> dict:
    return sharding.batch_shardings(self.mesh, micro_batches, leading=1)

  def eval_batch_shardings(self, batch: dict) -> dict:
    return sharding.batch_shardings(self.mesh, batch, leading=0)

  def jit_steps(self, state_shape, train_batch_shardings, eval_batch_shardings):
    """(train, evaluate), jitted with explicit shardings (the train state donated), not yet lowered."""
    return step_lib.jit_steps(self.graphdef, self.objective, self.tx, self.run.train, self.state_shardings,
                              train_batch_shardings, eval_batch_shardings, state_shape)

  def compile_steps(self, state_shape, train_batch_shardings, eval_batch_shardings, train_batch_shape,
                    eval_batch_shape):
    """(train, evaluate), compiled ahead of time for these shapes."""
    return step_lib.compile_steps(self.graphdef, self.objective, self.tx, self.run.train, self.state_shardings,
                                  train_batch_shardings, eval_batch_shardings, state_shape, train_batch_shape,
                                  eval_batch_shape)

  def train_step_flops(self, state_shape, train_batch_shape) -> float:
    """XLA's FLOP count of one train step, every scan (layers, micro-batches) multiplied out."""
    return step_lib.train_step_flops(self.run.model, self.objective, self.tx, self.run.train, state_shape,
                                     train_batch_shape)


def build(run: RunConfig, mesh, *, initialize: bool = True, initial_params: dict | None = None):
  """(Program, state): the state initialised (random or `initial_params`), or with `initialize=False` only its
  ShapeDtypeStructs with shardings (a restore target, or what compile_check compiles for)."""
  objective = Objective.from_config(run.loss)
  graphdef, abstract = transformer.abstract_model(run.model)
  tx = optimizer.make_optimizer(run, abstract.to_pure_dict())
  state, state_sh = state_lib.create_train_state(run.model, tx, mesh, run.seed, initialize=initialize,
                                                 initial_params=initial_params, ema=run.train.keeps_ema)
  return Program(run, mesh, graphdef, objective, tx, state_sh), state
