"""orbax checkpoints of the train state and the grain iterator: `<workdir>/checkpoints/<step>/` (see run/__init__.py).

Faults a run survives:
  * a process killed mid-save (even kill -9) leaves a temporary directory, removed at the next start; resume takes
    the newest committed step (orbax's commit marker; a bare numeric directory is moved aside);
  * a process killed between orbax's commit and the checksum file leaves a step that cannot be verified: it does not
    count (run/checkpoint_layout.why_incomplete), is moved aside at the next start and the step before it restored;
  * a committed step whose files were changed afterwards (flipped bytes, a truncated or deleted file) fails the
    checksums written beside it once it was committed; it is moved aside and the step before it restored;
  * a save that fails for the disk (full, read-only, permissions) stops the run with one line that names the step
    to resume from;
  * a checkpoint of another model (e.g. model.num_layers changed) is refused with the differing config fields;
  * a train state holding inf / NaN (a diverged run) is never saved: the save raises NonFiniteError instead.
"""

import os

import grain
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

import jax
import jax.numpy as jnp

from lenvm_jax import distributed, errors
from lenvm_jax.config import RunConfig
from lenvm_jax.errors import CheckpointError
from lenvm_jax.run import checkpoint_layout, checkpoint_restore, config_history
from lenvm_jax.train import state as state_lib


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float array of `tree` is free of inf and NaN (one scalar, so one small transfer per save)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _options(keep: int, keep_best: str, async_save: bool) -> ocp.CheckpointManagerOptions:
  """Keeps the last `keep` steps and, with keep_best, the one with the least eval metric (NaN counts as the worst;
  best_fn makes orbax store each step's metrics, the preservation policy keeps both kinds)."""
  latest = ocp.checkpoint_managers.LatestN(n=keep)
  metric = None
  policy = latest
  if keep_best:
    def metric(metrics) -> float:
      value = float(metrics.get(keep_best, float("inf")))
      return value if value == value else float("inf")

    best = ocp.checkpoint_managers.BestN(get_metric_fn=metric, reverse=True, n=1,
                                         keep_checkpoints_without_metrics=False)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])
  return ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=metric, best_mode="min", create=True,
                                      cleanup_tmp_directories=True, enable_async_checkpointing=async_save)


class Checkpointer:

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool, keep_best: str = ""):
    self.workdir = workdir
    self.directory = checkpoint_layout.checkpoint_dir(workdir)
    self.every_steps = every_steps
    self.keep_best = keep_best
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):  # Before orbax's threads trip on it.
      raise CheckpointError.at("the checkpoint path is not a directory", self.directory,
                               "move that file out of the workdir (a run keeps its checkpoints there) or use another "
                               "--workdir")
    if distributed.is_leader():
      checkpoint_layout.require_checksums(workdir)  # Before the first save: from here on a step counts with its checksums.
      for step in checkpoint_layout.incomplete_steps(workdir):
        why = checkpoint_layout.why_incomplete(workdir, step)
        moved = checkpoint_layout.reject_step(workdir, step, why)
        logging.warning("checkpoint step %d is incomplete (%s): moved to %s", step, why, moved)
    _sync("lenvm_checkpoints_scanned")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=_options(keep, keep_best, async_save),
        # Handlers named up front, so a fresh manager can read a step's metadata before restoring it.
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()})
    self._unsealed: list[int] = []  # Saved steps whose checksums are not written yet.

  def latest_step(self) -> int | None:
    return checkpoint_layout.latest_step(self.workdir)

  def steps(self) -> list[int]:
    return checkpoint_layout.complete_steps(self.workdir)

  def _failed(self, step: int, error: Exception) -> Exception:
    """A save that failed for the disk as a CheckpointError that names the step to resume from; else `error`."""
    reason = errors.os_error_reason(error)
    if reason is None:
      return error
    done = [s for s in self.steps() if s != step]
    resume = f"it resumes from step {done[-1]}" if done else "it starts afresh (no complete checkpoint yet)"
    return CheckpointError.at(f"cannot save checkpoint step {step}: {reason}", self.directory,
                              errors.rerun_advice(error, resume))

  def _seal(self):
    """Checksums for the saved steps that orbax has committed since (the leader writes them): only then does a step
    count (checkpoint_layout.complete_steps)."""
    pending = []
    committed = checkpoint_layout.committed_steps(self.workdir)
    for step in self._unsealed:
      if step in committed:
        if distributed.is_leader():
          try:
            checkpoint_layout.write_checksums(self.workdir, step)
          except FileNotFoundError:  # Removed meanwhile (keep): nothing to seal.
            pass
          except OSError as e:  # Without checksums the step does not count: the disk's fault stops the run.
            failure = self._failed(step, e)
            if failure is e:
              logging.warning("could not write the checksums of checkpoint step %d (it will not count): %s", step, e)
            else:
              self._unsealed = pending
              raise failure from None
      elif not self.manager.is_saving_in_progress():
        continue  # Never committed (a failed save): nothing to seal.
      else:
        pending.append(step)
    self._unsealed = pending

  def poll(self):
    """Between steps: surfaces a failed background save and seals committed steps, without waiting."""
    if self._unsealed and not self.manager.is_saving_in_progress():
      self.wait()

  def due(self, step: int, metrics: dict | None = None) -> bool:
    """Whether `save` would save `step` without force: every `every_steps`, and eval steps with keep_best."""
    return not step % self.every_steps or bool(self.keep_best and metrics is not None)

  def save(self, step: int, state, data_iter, force: bool = False, metrics: dict | None = None) -> bool:
    """Saves when `step` is due (or `force`, or `metrics` come with keep_best); returns whether a save started.
    Async: returns before the write ends."""
    if not force and not self.due(step, metrics):
      return False
    self.wait()
    if step in self.manager.all_steps():
      return False
    if not bool(all_finite(state)):
      done = self.steps()
      kept = f"the last checkpoint, step {done[-1]}, is intact" if done else "no checkpoint was written"
      raise errors.NonFiniteError(
          f"the train state at step {step} holds inf or NaN values (the run diverged): it was not checkpointed and "
          f"{kept}; resume with a smaller config.optim.lr (or a longer config.optim.warmup_steps)")
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)),
          metrics=dict(metrics) if self.keep_best and metrics is not None else None, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from None
    if started:
      self._unsealed.append(step)
      self.poll()  # A synchronous save is committed already.
    return started

  def restore(self, step: int, target, data_iter=None):
    """The state pytree as saved, into the shardings that `target` (ShapeDtypeStructs with shardings) names; the
    data iterator is restored in place when given (inference passes none). Through the run's one restore core
    (run/checkpoint_restore.py), which also reads checkpoints written before the decoder layers were stacked."""
    return checkpoint_restore.restore_state(self.manager, step, target, data_iter=data_iter)

  def restore_train_state(self, step: int, abstract_state, data_iter=None):
    """A TrainState through the tree the checkpoint holds (state.checkpoint_target / from_checkpoint), so checkpoints
    written with or without a weight EMA, or before TrainState had one, restore into either kind of run."""
    stored = self.manager.item_metadata(step).state
    restored = self.restore(step, state_lib.checkpoint_target(abstract_state, stored), data_iter)
    return state_lib.from_checkpoint(abstract_state, restored)

  def restore_newest(self, abstract_state, data_iter, run: RunConfig):
    """(step, TrainState) of the newest step that restores intact, or (None, None) when there is none yet. Steps
    after it (corrupt or unreadable) are moved aside, so this run saves those steps afresh."""
    steps = self.steps()
    if not steps:
      return None, None

    def restore(step):
      stored = self.manager.item_metadata(step).state
      mismatch = checkpoint_restore.tree_mismatch(stored["params"], abstract_state.params)
      if mismatch:
        raise self._mismatch(step, mismatch, run)
      return self.restore_train_state(step, abstract_state, data_iter)

    try:
      state, step, skipped = checkpoint_restore.first_restorable(self.workdir, steps[::-1], restore)
    except CheckpointError as e:
      raise self._with_config_changes(e, steps[-1], run) from None
    if skipped:
      if distributed.is_leader():
        for bad, why in skipped:
          moved = checkpoint_layout.reject_step(self.workdir, bad, why)
          logging.warning("checkpoint step %d is damaged (%s): moved to %s", bad, why, moved)
      _sync("lenvm_checkpoints_rejected")
      self.manager.reload()
    logging.warning("resuming from checkpoint step %d%s", step,
                    f" (skipped {', '.join(str(s) for s, _ in skipped)})" if skipped else "")
    return step, state

  def _mismatch(self, step: int, mismatch: str, run: RunConfig) -> CheckpointError:
    changes = self._config_changes(step, run)
    trained = (f"it was trained with {'; '.join(changes)} (saved -> this run)" if changes
               else "the run's saved config does not say why")
    return CheckpointError.at(f"checkpoint step {step} does not match this run's model: {mismatch}; {trained}",
                              checkpoint_layout.step_dir(self.workdir, step),
                              "resume with the config the run was trained with, or use a new --workdir")

  def _config_changes(self, step: int, run: RunConfig) -> list[str]:
    try:
      return config_history.differing_fields(config_history.read_config(self.workdir, step), run)
    except errors.UserError:
      return []

  def _with_config_changes(self, error: CheckpointError, step: int, run: RunConfig) -> CheckpointError:
    changes = self._config_changes(step, run)
    if not changes or "does not match" in str(error):
      return error
    return CheckpointError(f"{error} (this run's config differs from the one that saved them: {'; '.join(changes)})")

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(self._unsealed[-1] if self._unsealed else -1, e) from None
    self._seal()

  def close(self):
    """Waits for the last save, seals it and closes; raises the first failure (a CheckpointError for the disk)."""
    failure = None
    try:
      self.wait()
    except Exception as e:  # pylint: disable=broad-except
      failure = e
    try:
      self.manager.close()  # Re-raises a failed background save; the first report is kept.
    except Exception as e:  # pylint: disable=broad-except
      failure = failure or self._failed(self._unsealed[-1] if self._unsealed else -1, e)
    if failure is not None:
      raise failure
