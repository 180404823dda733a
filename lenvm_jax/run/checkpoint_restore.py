"""The one restore core of a run's checkpoints: the trainer's Checkpointer (the whole train state and the grain
iterator, to resume) and the readers (prediction, decoding, export, evaluation: the parameters alone through
`restore_params`, no optimizer state) both go through `restore_state` and `first_restorable`: the newest step whose
files pass their checksums and that restores, a checkpoint of another model refused by its shapes, and the
conversion of checkpoints written before the decoder layers were stacked.
"""

import os
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from lenvm_jax import sharding
from lenvm_jax.errors import CheckpointError
from lenvm_jax.model import legacy_layers
from lenvm_jax.run import checkpoint_layout, config_history


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree) -> dict:
  """{path: shape} of a tree's arrays, with per-layer subtrees (layers/<i>/...) seen as one stacked layers/...
  entry of shape (count, ...): a checkpoint from before the decoder layers were stacked compares by its shapes."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  out, per_layer = {}, {}
  for path, leaf in leaves:
    if not hasattr(leaf, "shape"):
      continue
    parts = _path_key(path).split("/")
    at = parts.index("layers") + 1 if "layers" in parts else len(parts)
    if at < len(parts) and parts[at].isdigit():
      per_layer.setdefault("/".join(parts[:at] + parts[at + 1:]), []).append(tuple(leaf.shape))
    else:
      out["/".join(parts)] = tuple(leaf.shape)
  for key, shapes in per_layer.items():
    out[key] = (len(shapes),) + shapes[0] if len(set(shapes)) == 1 else ("per-layer shapes differ",)
  return out


def tree_mismatch(stored, target) -> str | None:
  """The first difference between a checkpoint's tree (orbax metadata) and a restore target, or None."""
  have, want = _shapes(stored), _shapes(target)
  missing = sorted(want.keys() - have.keys())
  if missing:
    return f"{missing[0]} is not in the checkpoint" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
  extra = sorted(have.keys() - want.keys())
  if extra:
    return f"the checkpoint has {extra[0]}, the model does not" + (f" (and {len(extra) - 1} more)" if len(extra) > 1
                                                                   else "")
  for key in sorted(want):
    if have[key] != want[key]:
      return f"{key} has shape {have[key]} in the checkpoint, {want[key]} in the model"
  return None


def _short(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def first_restorable(workdir: str, steps: list[int], restore: Callable[[int], object]):
  """(restore(step), step, skipped) for the first of `steps` whose files pass their checksums and that restores;
  skipped = [(step, why)] of those before it. A CheckpointError from `restore` (a checkpoint of another model) stops
  the search: older steps would not match either. Raises CheckpointError if none restores."""
  skipped = []
  for step in steps:
    problem = checkpoint_layout.verify_checksums(workdir, step)
    if problem is None:
      try:
        return restore(step), step, skipped
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Unreadable files: try the step before.
        problem = _short(e)
    logging.warning("checkpoint step %d cannot be restored (%s); trying the previous one", step, problem)
    skipped.append((step, problem))
  reasons = "; ".join(f"step {s}: {p}" for s, p in skipped)
  raise CheckpointError.at(f"no checkpoint restores ({reasons})", checkpoint_layout.checkpoint_dir(workdir),
                           "the checkpoints are damaged; restore them from a backup or start a new run")


def restore_state(manager: ocp.CheckpointManager, step: int, target, state_args=ocp.args.StandardRestore,
                  data_iter=None):
  """The `state` item of `step` restored into `target` (ShapeDtypeStructs with shardings, in the stacked layout)
  with `state_args(target)`; the grain iterator restored in place when `data_iter` is given. A checkpoint written
  before the decoder layers were stacked is restored per layer and stacked (model/legacy_layers.py): the one place
  that conversion happens, for the trainer and the readers alike."""
  stored = manager.item_metadata(step)["state"]
  if legacy_layers.stored_per_layer(stored.get("params") or {}):
    target = legacy_layers.per_layer_target(target)
  items = {"state": state_args(target)}
  if data_iter is not None:
    import grain  # pylint: disable=g-import-not-at-top  # Only the trainer resumes a data iterator.
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  return legacy_layers.stack_layers(manager.restore(step, args=ocp.args.Composite(**items)).state)


def _partial_restore(target) -> ocp.args.PyTreeRestore:
  """Only the subtrees `target` names (the parameters, not the optimizer state)."""
  return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)


def _reader(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_layout.checkpoint_dir(workdir),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True, lightweight_initialize=True))


def restore_params(workdir: str, abstract_params, step: int | str | None = None, keep_best: str = ""):
  """(params, step): the weights a run is evaluated and served with (its EMA when it keeps one), restored into the
  shapes and shardings of `abstract_params` (ShapeDtypeStructs with shardings), from `step` ("latest" or None: the
  newest step that restores intact, "best": the best by `keep_best`, or a step number)."""
  manager = _reader(workdir)

  def restore(candidate):
    stored = manager.item_metadata(candidate)["state"]
    name = "ema_params" if stored.get("ema_params") is not None else "params"
    mismatch = tree_mismatch(stored[name], abstract_params)
    if mismatch:
      raise CheckpointError.at(f"checkpoint step {candidate} does not match the model of the run's config "
                               f"({mismatch})", checkpoint_layout.step_dir(workdir, candidate),
                               f"the run's {os.path.basename(config_history.config_path(workdir, candidate))} must "
                               "describe its checkpoints")
    return restore_state(manager, candidate, {name: abstract_params}, _partial_restore)[name]

  try:
    params, restored_step, skipped = first_restorable(
        workdir, checkpoint_layout.steps_to_try(workdir, step, keep_best), restore)
  finally:
    manager.close()
  if skipped:
    logging.warning("using checkpoint step %d; skipped %s", restored_step,
                    "; ".join(f"step {s} ({why})" for s, why in skipped))
  return params, restored_step


def abstract_params_on(abstract_state, mesh) -> dict:
  """ShapeDtypeStructs of a model's parameters, sharded on `mesh` by their logical axes (a restore target)."""
  shardings = sharding.param_shardings(abstract_state, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state.to_pure_dict(), shardings)
