"""orbax checkpoints of the train state and the grain iterator: `<workdir>/checkpoints/<step>/`.

orbax writes each step to a temporary directory and renames it when complete, so a process killed mid-save
(even kill -9) leaves at most a temporary directory that `latest_step` ignores: resume takes the last complete one.
"""

import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lenvm_jax.train.state import TrainState


class Checkpointer:

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        # Handlers named up front, so a fresh manager can read a step's metadata before restoring it.
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); returns whether a save started. Async: returns before the write ends."""
    if not force and step % self.every_steps:
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """State restored into the shardings that `abstract_state` (ShapeDtypeStructs with shardings) names; the data
    iterator is restored in place when given (inference passes none).

    The weight EMA follows the target, not the checkpoint: a checkpoint without one (train.ema_decay was 0, or it
    predates the field) restores into a target that keeps one with the EMA started at the restored weights, and a
    checkpoint's EMA is dropped when the target keeps none.
    """
    is_train_state = isinstance(abstract_state, TrainState)  # Any other pytree restores as it was saved.
    target = self._train_state_target(step, abstract_state) if is_train_state else abstract_state
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items)).state
    if not is_train_state:
      return restored
    restored = dict(restored)
    ema = restored.pop("ema_params", None)
    if abstract_state.ema_params is None:
      ema = None
    elif ema is None:
      ema = jax.tree.map(jnp.copy, restored["params"])
    return TrainState(**restored, ema_params=ema)

  def _train_state_target(self, step: int, abstract_state: TrainState) -> dict:
    """The restore target as a dict of the fields the checkpoint holds, its EMA (if any) shaped like params."""
    stored = self.manager.item_metadata(step).state
    target = {name: getattr(abstract_state, name) for name in stored if name != "ema_params"}
    if "ema_params" in stored:
      target["ema_params"] = None if stored["ema_params"] is None else abstract_state.params
    return target

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
