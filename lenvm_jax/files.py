"""Writes that cannot escape their directory, and names read from files that must stay inside theirs.

`write_atomic` is the one way the project writes a small file (markers, configs, checksums, reports): the bytes go to
a temporary name created exclusively (O_EXCL | O_NOFOLLOW) inside the target's own directory, are fsynced, and are
renamed over the target. So a symlink planted at the target or at a temporary name is never followed (rename replaces
the link itself), a reader never sees half a file, and a crash leaves either the old file or the new one.

`inside` checks a relative name read from data (a safetensors index's weight_map, a shard list) before it is joined
to its directory: absolute names and `..` components are refused, so an index cannot make us read elsewhere.

This module imports nothing heavy (stdlib + errors), so every layer can use it.
"""

import contextlib
import os
import secrets

from lenvm_jax.errors import UserError


def _exclusive_temporary(dir_fd: int, name: str, mode: int) -> tuple[str, int]:
  for _ in range(100):
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
      return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                          dir_fd=dir_fd)
    except FileExistsError:
      continue
  raise FileExistsError(f"no free temporary name for {name} in its directory")


@contextlib.contextmanager
def atomic_path(path: str, mode: int = 0o644):
  """For writers that take a path (safetensors' save_file): yields the path of a new, empty temporary file created
  exclusively beside `path`; once the block ends without an error it is fsynced and renamed to `path`, else
  removed."""
  directory, name = os.path.split(os.path.abspath(path))
  dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  try:
    tmp, fd = _exclusive_temporary(dir_fd, name, mode)
    os.close(fd)
    try:
      yield os.path.join(directory, tmp)
      fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
      os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
      raise
    with contextlib.suppress(OSError):
      os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def write_atomic(path: str, data: str | bytes, mode: int = 0o644) -> None:
  """`path` := `data` (str is written as UTF-8), atomically and without following a symlink anywhere in the final
  component or the temporary one."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  with atomic_path(path, mode) as temporary:
    fd = os.open(temporary, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
    finally:
      os.close(fd)


def write_report(path: str, data: str | bytes, *, items: int, what: str, where: str) -> None:
  """A report (an evaluation's table, a stats file) built from `items` inputs: with none, it is refused before
  anything is written, so an earlier report at `path` is never replaced by an empty one."""
  if items <= 0:
    kept = " (the existing report is kept)" if os.path.exists(path) else ""
    raise UserError.at(f"no {what} to report{kept}", where, f"give input that has {what}")
  write_atomic(path, data)


def inside(directory: str, name: str, what: str) -> str:
  """`directory`/`name` for a relative `name` read from a file (`what` says which, for the error), refusing absolute
  names and `..` components: a name read from data must not reach outside its directory. Symlinks inside the
  directory are the directory owner's choice (the Hugging Face cache links its snapshots to blobs) and are kept."""
  if (not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or "\0" in name
      or ".." in name.split("/")):
    raise UserError.at(f"{what} names {name!r}, a path outside its directory", directory,
                       "the file is damaged or was not made for this directory; entries must be plain relative names")
  return os.path.join(directory, os.path.normpath(name))
