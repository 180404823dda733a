"""orbax checkpoints of the train state and the grain iterator: `<workdir>/checkpoints/<step>/`.

orbax writes each step to a temporary directory and renames it when complete, so a process killed mid-save
(even kill -9) leaves at most a temporary directory that `latest_step` ignores: resume takes the last complete one.
"""

import grain
import orbax.checkpoint as ocp

from lenvm_jax import rundir
from lenvm_jax.train import state as state_lib


class Checkpointer:

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool):
    self.directory = rundir.checkpoint_dir(workdir)
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

  def restore(self, step: int, target, data_iter=None):
    """The state pytree as saved, into the shardings that `target` (ShapeDtypeStructs with shardings) names; the
    data iterator is restored in place when given (inference passes none)."""
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def restore_train_state(self, step: int, abstract_state, data_iter=None):
    """A TrainState through the tree the checkpoint holds (state.checkpoint_target / from_checkpoint), so checkpoints
    written with or without a weight EMA, or before TrainState had one, restore into either kind of run."""
    target = state_lib.checkpoint_target(abstract_state, self.manager.item_metadata(step).state)
    return state_lib.from_checkpoint(abstract_state, self.restore(step, target, data_iter))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
