"""User errors: what a user can cause and fix (a path, a file, a config field, data, a checkpoint, a busy workdir).

Every command-line tool (experiments/cli.py) prints a UserError as one line, `error: <message>`, and exits with
status 2; any other exception is a bug and keeps its traceback. A message names the culprit: `config.<section>.<field>:
...` (ConfigError), `<file>:<line>: field '<name>': ...` (RecordError), or `<what> (<where>): <what to do>` (`at`).

This module imports nothing heavy, so config tooling and launchers can use it.
"""

import errno
import os
import re


class UserError(Exception):
  """A problem the user can fix; the message says what, where, and what to do."""

  @classmethod
  def at(cls, what: str, where: str, fix: str) -> "UserError":
    return cls(f"{what} ({where}): {fix}")


class CheckpointError(UserError):
  """No checkpoint to restore, none that restores intact, one that does not match the model, or a failed save."""


class ModelFileError(UserError, ValueError):
  """A model file (safetensors weights, an index, a value head, a GGUF) that is damaged, truncated or of another
  shape; the message names the file. A ValueError too, so callers that treat a bad model as a ValueError still do."""


class NonFiniteError(UserError, FloatingPointError):
  """A run that diverged: non-finite losses for too many steps in a row, or weights that would be checkpointed
  non-finite. The last checkpoint is left intact."""


class WorkdirBusy(UserError):
  """Another live trainer holds the workdir's lock."""


# errno -> (what happened, what to do). OSErrors with these codes come from the user's paths, disks and permissions.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space on that disk (or choose another location), then rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space (or choose another location), then rerun"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another location"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("not a directory", "a part of the path is a file; choose a directory path"),
    errno.EISDIR: ("is a directory", "give a file path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}
# Storage libraries (tensorstore under orbax) report an OSError as text: "... [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_code(error: BaseException) -> int | None:
  """The errno of a user-fixable OSError, also when a storage library wrapped it in another exception's text."""
  if isinstance(error, OSError) and error.errno in _OS_ERRORS:
    return error.errno
  text = str(error)
  match = _OS_ERROR_CODE.search(text)
  if match and int(match.group(1)) in _OS_ERRORS:
    return int(match.group(1))
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
    if os.strerror(code) in text:
      return code
  return None


def os_error_reason(error: BaseException) -> str | None:
  """'no space left on device', 'permission denied', ...: the user-fixable cause of `error`, or None."""
  code = os_error_code(error)
  return None if code is None else _OS_ERRORS[code][0]


def os_error_fix(error: BaseException) -> str | None:
  """What to do about a user-fixable OSError (see os_error_reason), or None."""
  code = os_error_code(error)
  return None if code is None else _OS_ERRORS[code][1]


def rerun_advice(error: BaseException, resume: str) -> str | None:
  """For a write of a run that failed for the disk or the path: what to fix before rerunning the same command (which
  `resume`s), or None when `error` is no such fault."""
  code = os_error_code(error)
  if code is None:
    return None
  if code in (errno.ENOSPC, errno.EDQUOT):
    return f"free space, then rerun the same command: {resume}"
  if code in (errno.EROFS, errno.EACCES, errno.EPERM):
    return f"make the location writable, then rerun the same command: {resume}"
  return f"{_OS_ERRORS[code][1]}; then rerun the same command: {resume}"


def from_os_error(error: BaseException, where: str | None = None) -> UserError | None:
  """The UserError for an OSError a user can fix (a missing path, a full or read-only disk, permissions), or None."""
  code = os_error_code(error)
  if code is None:
    return None
  what, fix = _OS_ERRORS[code]
  if where is None:
    paths = [p for p in (getattr(error, "filename", None), getattr(error, "filename2", None)) if p is not None]
    where = " -> ".join(map(str, paths)) or "?"
  return UserError.at(what, where, fix)
