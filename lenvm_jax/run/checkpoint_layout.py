"""Which checkpoint steps of a run count, and the files that prove it.

Only complete steps count: committed by orbax and, in a run that writes checksums, checksummed (a process killed
between orbax's commit and the checksum file leaves a step that would otherwise restore unverified). Incomplete or
damaged steps are moved aside (rejected_checkpoints/), never deleted.
"""

import json
import os
import shutil
import time
import zlib

from lenvm_jax import files
from lenvm_jax.errors import CheckpointError, UserError

CHECKSUM_FILE = "lenvm_checksums.json"
CHECKSUM_POLICY_FILE = "checkpoint_checksums.json"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step before the step's final rename.
REJECTED_DIR = "rejected_checkpoints"
METRICS_ITEM = "metrics"  # orbax's item of the metrics a step was saved with.


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(checkpoint_dir(workdir), str(step))


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
