"""<workdir>/.lock: one trainer per run directory."""

import contextlib
import fcntl
import json
import os
import socket
import time

from absl import logging

from lenvm_jax.errors import WorkdirBusy

LOCK_FILE = ".lock"


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
