"""Whether a path can be a run directory, checked before a trainer takes it: a URL is refused (run files are written
with local file I/O), and the directory is created and probed for writing."""

import contextlib
import errno
import os
import re

from lenvm_jax.config import ConfigError
from lenvm_jax.errors import UserError


def is_url(path: str) -> bool:
  """gs://, s3://, ...: run files are written with local file I/O, so such a workdir needs a mount instead."""
  return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def check_workdir(workdir: str):
  """A run's files are written with local file I/O (and orbax under an absolute path), so a URL workdir would land in a
  local folder named after it and vanish with the machine: refuse it and say how to mount the bucket instead."""
  if is_url(workdir):
    raise ConfigError(f"workdir {workdir!r} is a URL, but checkpoints, metrics and config are written to local paths "
                      "(they would end up under a local folder named after it). Pass a mounted path: Vertex AI "
                      "mounts gs://BUCKET at /gcs/BUCKET; on TPU VMs and GKE mount the bucket with Cloud Storage FUSE.")


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
