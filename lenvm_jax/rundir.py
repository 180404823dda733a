"""A run directory (`--workdir`): the config it trained with and its checkpoints, read without the training stack.

  <workdir>/config.json                 the RunConfig (loss.gamma resolved), written once the run has started
  <workdir>/checkpoints/<step>/state    orbax: TrainState (step, params, opt_state, rng, nonfinite_skips, ema_params)
  <workdir>/checkpoints/<step>/data_iter  the grain iterator position (training only)

Training writes these (train/checkpointing.py); prediction, decoding, export and evaluation read the parameters
alone through `restore_params` (no optimizer, no train state), so inference does not depend on the trainer.
"""

import json
import os

import jax
import orbax.checkpoint as ocp

from lenvm_jax import sharding
from lenvm_jax.config import RunConfig

CONFIG_FILE = "config.json"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def read_config(workdir: str) -> RunConfig:
  """The typed config a run trained with (older runs' config.json files load with defaults for newer fields)."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path, encoding="utf-8") as f:
    return RunConfig.from_dict(json.load(f))


def write_config(workdir: str, run: RunConfig):
  with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(run.to_json())


def _manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def latest_step(workdir: str) -> int | None:
  manager = _manager(workdir)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_params(workdir: str, abstract_params, step: int | None = None):
  """(params, step): the weights a run is evaluated and served with (its EMA when it keeps one), restored into the
  shapes and shardings of `abstract_params` (ShapeDtypeStructs with shardings), from `step` or the latest one."""
  manager = _manager(workdir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(workdir)}")
    stored = manager.item_metadata(step)["state"]
    name = "ema_params" if stored.get("ema_params") is not None else "params"
    target = {name: abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return restored.state[name], step
  finally:
    manager.close()


def abstract_params_on(abstract_state, mesh) -> dict:
  """ShapeDtypeStructs of a model's parameters, sharded on `mesh` by their logical axes (a restore target)."""
  shardings = sharding.param_shardings(abstract_state, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state.to_pure_dict(), shardings)
