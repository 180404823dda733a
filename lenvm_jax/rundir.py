"""A run directory (`--workdir`): its lock, the configs it trained with and its checkpoints, read without the trainer.

  <workdir>/.lock                     host and pid of the trainer that runs it (WorkdirLock)
  <workdir>/config.json               the RunConfig (loss.gamma resolved), written once a run has started cleanly
  <workdir>/config.<step>.json        a config that a resumed run replaced: it trained the steps up to <step>
  <workdir>/checkpoints/<step>/       orbax: state (TrainState), data_iter (grain position), metrics (eval metrics,
                                      with checkpoint.keep_best) and orbax's commit marker (commit_success.txt)
  <workdir>/checkpoints/<step>/lenvm_checksums.json   size + CRC32 of each file of the step, once it is committed
  <workdir>/checkpoint_checksums.json   written before a run's first save: steps after `required_after_step` count
                                      only once their checksums are written too
  <workdir>/rejected_checkpoints/<step>-<time>/       steps a resuming trainer found incomplete or corrupt, moved aside

Only complete steps count: committed by orbax and, in a run that writes checksums, checksummed (a process killed
between orbax's commit and the checksum file leaves a step that would otherwise restore unverified).

Readers (prediction, decoding, export, evaluation) take the parameters alone through `restore_params` (no optimizer,
no train state), from the newest step that restores intact unless told a step.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import zlib
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from lenvm_jax import files, sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.errors import CheckpointError, UserError, WorkdirBusy
from lenvm_jax.model import legacy_layers

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
CHECKSUM_FILE = "lenvm_checksums.json"
CHECKSUM_POLICY_FILE = "checkpoint_checksums.json"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step before the step's final rename.
REJECTED_DIR = "rejected_checkpoints"
METRICS_ITEM = "metrics"  # orbax's item of the metrics a step was saved with.


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(checkpoint_dir(workdir), str(step))


# ----------------------------------------------------------------------------------------------------- configs


def replaced_config_steps(workdir: str) -> list[int]:
  """Steps k of the config.<k>.json files: configs that trained up to step k, replaced by a resumed run."""
  if not os.path.isdir(workdir):
    return []
  names = (n[len("config."):-len(".json")] for n in os.listdir(workdir)
           if n.startswith("config.") and n.endswith(".json"))
  return sorted(int(n) for n in names if n.isdigit())


def config_path(workdir: str, step: int | None = None) -> str:
  """The config that trained `step` (config.<k>.json of the least replaced k >= step, else config.json)."""
  if step is not None:
    replaced = [k for k in replaced_config_steps(workdir) if k >= step]
    if replaced:
      return os.path.join(workdir, f"config.{replaced[0]}.json")
  return os.path.join(workdir, CONFIG_FILE)


def read_config(workdir: str, step: int | None = None) -> RunConfig:
  """The typed config a run trained `step` with (default: its current config). Older runs' config.json files load
  with defaults for newer fields."""
  path = config_path(workdir, step)
  if not os.path.isfile(path):
    if os.path.isdir(workdir):
      raise UserError.at(f"not a run directory: it has no {CONFIG_FILE}", os.path.abspath(workdir),
                         "give the --workdir of a run that has started training (config.json is written once the "
                         "run has started)")
    raise UserError.at("no such run directory", os.path.abspath(workdir), "check the --workdir path")
  try:
    with open(path, encoding="utf-8") as f:
      return RunConfig.from_dict(json.load(f))
  except ValueError as e:
    if isinstance(e, UserError):
      raise
    raise UserError.at(f"the run's config is not valid JSON ({e})", path, "restore the file from the run") from None


def _same_config(path: str, run: RunConfig) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      return RunConfig.from_dict(json.load(f)) == run
  except (OSError, ValueError):
    return False


def write_config(workdir: str, run: RunConfig, resumed_from: int | None = None):
  """config.json := run (atomically). When a resumed run changes the config, the one that trained up to its resume
  step is kept as config.<resumed_from>.json (the first such: a later one trained no checkpoint of that step)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if resumed_from is not None and os.path.isfile(path) and not _same_config(path, run):
    kept = os.path.join(workdir, f"config.{resumed_from}.json")
    if os.path.exists(kept):
      os.remove(path)
    else:
      os.replace(path, kept)
      logging.info("the config changed at resume: the one that trained steps up to %d is kept in %s", resumed_from,
                   kept)
  files.write_atomic(path, run.to_json())


def differing_fields(saved: RunConfig, run: RunConfig, limit: int = 4) -> list[str]:
  """'model.num_layers: 2 -> 3' for the fields that differ (model fields first), at most `limit`."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  old, new = flat(saved.to_dict()), flat(run.to_dict())
  changed = sorted((k for k in old.keys() | new.keys() if old.get(k) != new.get(k)),
                   key=lambda k: (not k.startswith("model."), k))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:limit]]


# -------------------------------------------------------------------------------------------------------- lock


def _process_start(pid: int) -> str | None:
  """The start time of a process (clock ticks since boot, from /proc), to tell it from a later one with its pid."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  if pid <= 0:  # Unknown: assume it runs.
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  now = _process_start(pid)
  return start is None or now is None or now == start


class WorkdirLock:
  """<workdir>/.lock: the trainer that runs a workdir, so a second one refuses instead of interleaving its metrics
  and overwriting the checkpoints and config.

  The lock file appears atomically with its contents (written to a private file, then hard-linked into place) and its
  holder keeps an flock on it. A lock whose process is gone (a dead pid on this host, e.g. after kill -9) is taken
  over with a warning; a lock of another host is never taken over (its pid cannot be checked from here).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _info(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}

  def acquire(self):
    private = f"{self.path}.{socket.gethostname()}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):  # Left by a killed process that had this pid: ours now.
      os.unlink(private)
    fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR, 0o644)  # Never through a link.
    try:
      os.write(fd, json.dumps(self._info()).encode())
      os.fsync(fd)
      fcntl.flock(fd, fcntl.LOCK_EX)
      for _ in range(5):
        try:
          self._fd = self._place(private, fd)
          return
        except FileExistsError:
          self._remove_if_stale()
      raise WorkdirBusy.at("the workdir lock keeps changing hands", self.path, "another trainer is starting here; "
                           "choose another --workdir")
    finally:
      if fd != self._fd:
        os.close(fd)
      os.remove(private)

  def _place(self, private: str, private_fd: int) -> int:
    """Puts the lock file in place atomically (FileExistsError if a lock exists); returns the flocked fd to hold."""
    try:
      os.link(private, self.path)
      return private_fd
    except FileExistsError:
      raise
    except OSError:  # No hard links here (some FUSE mounts): an exclusive create, written right after.
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX)
      os.write(fd, json.dumps(self._info()).encode())
      return fd

  def _remove_if_stale(self):
    if os.path.lexists(self.path) and (os.path.islink(self.path) or not os.path.isfile(self.path)):
      raise WorkdirBusy.at("the workdir lock is not a regular file", self.path,
                           "no trainer made it: remove it if no trainer runs here, or choose another --workdir")
    try:
      fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
      return
    try:
      try:
        holder = json.loads(os.read(fd, 4096).decode())
      except ValueError:
        holder = None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise self._busy(holder) from None
      if isinstance(holder, dict):
        if holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
          raise self._busy(holder)
        logging.warning("taking over the stale workdir lock %s of pid %s (host %s, since %s): that process is gone",
                        self.path, holder.get("pid"), holder.get("host"), holder.get("since"))
      else:
        logging.warning("taking over the unreadable workdir lock %s", self.path)
      try:
        if os.fstat(fd).st_ino == os.stat(self.path).st_ino:  # Still the file judged stale.
          os.remove(self.path)
      except FileNotFoundError:
        pass
    finally:
      os.close(fd)

  def _busy(self, holder) -> WorkdirBusy:
    holder = holder if isinstance(holder, dict) else {}
    return WorkdirBusy.at(
        f"the workdir is in use by another trainer (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"since {holder.get('since', '?')})", self.path,
        "wait for it to finish or choose another --workdir; if that process is gone, delete the lock file")

  def release(self):
    if self._fd is None:
      return
    try:
      if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
        os.remove(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None


def make_workdir(workdir: str):
  """Creates the workdir, or says in one line why it cannot be a workdir (a file, a read-only mount, permissions)."""
  where = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError.at("the workdir is a file", where, "choose a directory path")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
      os.unlink(probe)
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, 0o600))  # Never through a link.
    os.remove(probe)
  except OSError as e:
    reason = os.strerror(e.errno) if e.errno else str(e)
    fix = "choose a writable location" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "check the path"
    raise UserError.at(f"cannot write the workdir: {reason.lower()}", where, fix) from None


# ------------------------------------------------------------------------------------------------- checkpoints


def _step_is_committed(path: str) -> bool:
  """orbax writes commit_success.txt (and the commit time into _CHECKPOINT_METADATA) before a step's final rename,
  so a numeric directory without them (created by hand, or by a copy cut short) holds no complete step."""
  if os.path.isfile(os.path.join(path, COMMIT_MARKER)):
    return True
  try:
    with open(os.path.join(path, "_CHECKPOINT_METADATA"), encoding="utf-8") as f:
      return json.load(f).get("commit_timestamp_nsecs") is not None
  except (OSError, ValueError, AttributeError):
    return False


def _numeric_steps(workdir: str) -> list[int]:
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def committed_steps(workdir: str) -> list[int]:
  """The steps orbax has committed, ascending (with or without their checksums)."""
  return [s for s in _numeric_steps(workdir) if _step_is_committed(step_dir(workdir, s))]


def _checksums_required_after(workdir: str) -> int | None:
  """Steps after this one count only with their checksums; None: a run from before checksums (none required)."""
  path = os.path.join(os.path.abspath(workdir), CHECKSUM_POLICY_FILE)
  if not os.path.lexists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return int(json.load(f)["required_after_step"])
  except (OSError, ValueError, KeyError, TypeError):
    return -1  # Damaged: require them of every step (a step set aside is kept, not deleted).


def _sealed(workdir: str, step: int) -> bool:
  return os.path.isfile(os.path.join(step_dir(workdir, step), CHECKSUM_FILE))


def require_checksums(workdir: str) -> None:
  """Before a run's first save: from now on a step counts only once its checksums are written. Steps already there
  without checksums are a run's from before them (kept, restored unverified) unless a step older than them has
  checksums (then they were cut off between commit and checksums, and do not count)."""
  if _checksums_required_after(workdir) is not None:
    return
  committed = committed_steps(workdir)
  sealed = [s for s in committed if _sealed(workdir, s)]
  after = (sealed[0] - 1) if sealed else (committed[-1] if committed else -1)
  files.write_atomic(os.path.join(os.path.abspath(workdir), CHECKSUM_POLICY_FILE),
                     json.dumps({"required_after_step": after}))


def why_incomplete(workdir: str, step: int) -> str | None:
  """Why a numeric step directory does not count (None: it does)."""
  if not _step_is_committed(step_dir(workdir, step)):
    return f"no commit marker ({COMMIT_MARKER}): the save never completed"
  after = _checksums_required_after(workdir)
  if after is not None and step > after and not _sealed(workdir, step):
    return (f"committed but without its checksums ({CHECKSUM_FILE}): the trainer stopped before writing them, so its "
            "files cannot be verified")
  return None


def complete_steps(workdir: str) -> list[int]:
  """The steps that count, ascending: committed and, in a run that writes checksums, checksummed (temporary,
  uncommitted and unverifiable directories do not count)."""
  return [s for s in _numeric_steps(workdir) if why_incomplete(workdir, s) is None]


def incomplete_steps(workdir: str) -> list[int]:
  return [s for s in _numeric_steps(workdir) if why_incomplete(workdir, s) is not None]


def latest_step(workdir: str) -> int | None:
  steps = complete_steps(workdir)
  return steps[-1] if steps else None


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _step_files(path: str) -> list[str]:
  out = []
  for root, _, names in os.walk(path):
    out += [os.path.relpath(os.path.join(root, n), path) for n in names if n != CHECKSUM_FILE]
  return sorted(out)


def write_checksums(workdir: str, step: int):
  """<step>/lenvm_checksums.json: size and CRC32 of each file of a committed step (orbax keeps none of its arrays'
  bytes, so flipped bits would restore silently)."""
  path = step_dir(workdir, step)
  manifest = {name: [os.path.getsize(os.path.join(path, name)), _crc32(os.path.join(path, name))]
              for name in _step_files(path)}
  files.write_atomic(os.path.join(path, CHECKSUM_FILE), json.dumps({"files": manifest}, sort_keys=True))


def verify_checksums(workdir: str, step: int) -> str | None:
  """What is wrong with a step's files, or None (also for a step without checksums: one of a run from before them;
  in a run that writes them such a step is not complete and never gets here)."""
  path = step_dir(workdir, step)
  manifest = os.path.join(path, CHECKSUM_FILE)
  if not os.path.isfile(manifest):
    return None
  try:
    with open(manifest, encoding="utf-8") as f:
      listed = sorted(json.load(f)["files"].items())
    for name, (size, crc) in listed:
      files.inside(path, name, CHECKSUM_FILE)
  except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
    return f"its {CHECKSUM_FILE} is unreadable"
  for name, (size, crc) in listed:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      return f"{name} is missing"
    if os.path.getsize(file) != size:
      return f"{name} has {os.path.getsize(file)} bytes, {size} were written"
    if _crc32(file) != crc:
      return f"{name} does not match its checksum (corrupted)"
  return None


def reject_step(workdir: str, step: int, reason: str) -> str:
  """Moves a step that cannot be resumed from out of checkpoints/ (so the run can save that step again); returns the
  new place. Nothing is deleted."""
  target = os.path.join(os.path.abspath(workdir), REJECTED_DIR, f"{step}-{time.time_ns()}")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(step_dir(workdir, step), target)
  files.write_atomic(os.path.join(target, "REJECTED.txt"), reason + "\n")
  return target


def step_metrics(workdir: str, step: int) -> dict | None:
  """The eval metrics a step was saved with (checkpoint.keep_best), or None."""
  path = os.path.join(step_dir(workdir, step), METRICS_ITEM, METRICS_ITEM)
  try:
    with open(path, encoding="utf-8") as f:
      metrics = json.load(f)
  except (OSError, ValueError):
    return None
  return metrics if isinstance(metrics, dict) else None


def best_step(workdir: str, metric: str) -> int | None:
  """The complete step with the least `metric` among those saved with metrics (the latest of equals), or None."""
  scored = []
  for step in complete_steps(workdir):
    value = (step_metrics(workdir, step) or {}).get(metric)
    if isinstance(value, (int, float)) and value == value:  # Not NaN.
      scored.append((value, -step))
  return -min(scored)[1] if scored else None


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
    problem = verify_checksums(workdir, step)
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
  raise CheckpointError.at(f"no checkpoint restores ({reasons})", checkpoint_dir(workdir),
                           "the checkpoints are damaged; restore them from a backup or start a new run")


def _reader(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True, lightweight_initialize=True))


def steps_to_try(workdir: str, step: int | str | None = None, keep_best: str = "") -> list[int]:
  """The steps `restore_params` tries, newest first: all complete ones for "latest" (or None), the best by
  `keep_best` for "best", else exactly `step`."""
  steps = complete_steps(workdir)
  if not steps:
    raise CheckpointError.at("no complete checkpoint", checkpoint_dir(workdir),
                             "train the run first (a checkpoint is saved every checkpoint.every_steps steps and at "
                             "the end)")
  if step in (None, "latest"):
    return steps[::-1]
  if step == "best":
    if not keep_best:
      raise CheckpointError.at("--step=best needs a run trained with checkpoint.keep_best", os.path.abspath(workdir),
                               "use --step=latest or a step number")
    best = best_step(workdir, keep_best)
    if best is None:
      raise CheckpointError.at(f"no checkpoint was saved with the eval metric {keep_best!r}",
                               checkpoint_dir(workdir), "use --step=latest or a step number")
    return [best]
  if step not in steps:
    raise CheckpointError.at(f"no complete checkpoint of step {step} (there are {', '.join(map(str, steps))})",
                             checkpoint_dir(workdir), "give one of those steps")
  return [step]


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
                               f"({mismatch})", step_dir(workdir, candidate),
                               f"the run's {os.path.basename(config_path(workdir, candidate))} must describe its "
                               "checkpoints")
    target = {name: abstract_params}
    if legacy_layers.stored_per_layer(stored[name]):  # Written before the decoder layers were stacked.
      target = legacy_layers.per_layer_target(target)
    restored = manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return legacy_layers.stack_layers(restored.state[name])

  try:
    params, restored_step, skipped = first_restorable(workdir, steps_to_try(workdir, step, keep_best), restore)
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


def check_export_dir(output: str, overwrite: bool) -> list[str]:
  """For an export of a model (experiments/export_hf.py, convert_gguf.py): the entries a non-empty output holds (to
  remove once the model has loaded); refuses a file, a run directory, or, without `overwrite`, any non-empty
  directory."""
  where = f"--output={output}"
  if os.path.exists(output) and not os.path.isdir(output):
    raise UserError.at("the output is a file", where, "give a directory")
  entries = sorted(os.listdir(output)) if os.path.isdir(output) else []
  if not entries:
    return []
  if os.path.isdir(os.path.join(output, "checkpoints")) or LOCK_FILE in entries:
    raise UserError.at("the output is a training run directory", where, "export into another directory")
  if not overwrite:
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise UserError.at(f"the output directory is not empty ({shown})", where,
                       "choose a new or empty directory, or pass --overwrite to replace its contents")
  return entries


def remove_entries(directory: str, names: list[str]) -> None:
  """Removes `names` (files, links or directories) from `directory`: what check_export_dir allowed --overwrite to
  replace, once the new model has loaded. A link is removed, never followed."""
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
