"""The error boundary that every command-line tool in experiments/ runs under: `cli.run(main)` instead of app.run.

What a user can cause (a flag, a config field, a path, a permission, a full or read-only disk, bad data, a checkpoint
that is missing, corrupt or of another model, a busy workdir) ends as one line on stderr, `error: <message>`, and
exit status 2. Any other exception is a bug and keeps its traceback (exit status 1).
"""

import contextlib
import functools
import importlib.machinery
import logging as logging_std
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import NoReturn

from absl import app, flags, logging as absl_logging
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from lenvm_jax import errors

USER_ERROR_EXIT = 2
STEP_CHOICES = ("latest", "best")


def fail(message) -> NoReturn:
  """Prints `error: <message>` as one line and exits with status 2."""
  print(f"error: {' '.join(str(message).splitlines())}", file=sys.stderr, flush=True)
  # Background writers (an async checkpoint save cut short) may still report at interpreter exit: the line above
  # says what happened, their echoes would bury it.
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  sys.exit(USER_ERROR_EXIT)


def guard(main):
  """`main` with user errors turned into `fail`; bugs propagate."""

  @functools.wraps(main)
  def guarded(argv):
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      fail(e)
    except OSError as e:
      user_error = errors.from_os_error(e)
      if user_error is None:
        raise
      fail(user_error)

  return guarded


@contextlib.contextmanager
def user_errors(*types):
  """Inside, exceptions of `types` count as the user's (a tool whose every such error comes from its input, e.g. a
  model directory no HF class can hold): they end as one line too."""
  try:
    yield
  except types as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.UserError(str(e)) from None


def _unknown_config_field(argv, error) -> str | None:
  """The message for an ml_collections override of a field the config lacks (it raises a bare AttributeError or
  KeyError while flags are parsed), or None when no `--<config>.<path>` argument names the missing key."""
  text = str(error).encode().decode("unicode_escape", errors="ignore")
  key = re.search(r"'(\w+)'", text)
  if key is None:
    return None
  for arg in argv[1:]:
    match = re.match(r"--?(\w+(?:\.\w+)+)(=|$)", arg)
    if match and key.group(1) in match.group(1).split(".")[1:]:
      suggestion = re.search(r'Did you mean "(\w+)"', text)
      hint = f"did you mean {suggestion.group(1)!r}? " if suggestion else ""
      return f"unknown config field ({match.group(1)}): {hint}the fields are listed in docs/configs.md"
  return None


def _line_in(error: BaseException, path: str) -> str:
  """':<line>' of the deepest frame of `error` that runs in the file `path` ('' if none does)."""
  if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == path:
    return f":{error.lineno}"
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == path]
  return f":{lines[-1]}" if lines else ""


def load_config_file(flag: str, argument: str, lock: bool = True):
  """What `--<flag>=<file>[:<arg>]` names: the file's get_config(<arg>), loaded here rather than by ml_collections,
  whose loader defers a missing file to the first access and lets a file that does not parse, raises or has no
  get_config end in a traceback. Each of those is a UserError naming the file (and its line)."""
  file = argument.split(":", 1)[0]
  args = argument.split(":", 1)[1:]
  where = f"--{flag}={argument}"
  if not file:
    raise errors.UserError.at("no config file given", where, "give the path of a config file")
  if not os.path.exists(file):
    raise errors.UserError.at("no such config file", where, "check the path (configs are in experiments/configs/)")
  if not os.path.isfile(file):
    raise errors.UserError.at("the config file is not a file", where, "give the path of a .py config file")
  path = os.path.abspath(file)
  try:
    module = importlib.machinery.SourceFileLoader(f"{flag}_config", file).load_module()
  except Exception as e:  # pylint: disable=broad-except  # Anything the user's file raises (SyntaxError included).
    raise errors.UserError(f"config file {file}{_line_in(e, path)}: {type(e).__name__}: {e}; fix the file") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise errors.UserError.at("the config file has no get_config()", where,
                              "define get_config() returning the config (see experiments/configs/)")
  try:
    config = get_config(*args)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"config file {file}{_line_in(e, path)}: get_config({', '.join(map(repr, args))}) "
                           f"raised {type(e).__name__}: {e}; fix the file") from None
  if not isinstance(config, (config_dict.ConfigDict, Mapping)):
    raise errors.UserError.at(f"get_config() returned {type(config).__name__}, not a config", where,
                              "return an ml_collections.ConfigDict (start from experiments/configs/base.py)")
  if lock and callable(getattr(config, "lock", None)):
    config.lock()
  return config


def _parse_config_file(self, argument):
  return load_config_file(self.name, argument, self._lock_config)  # pylint: disable=protected-access


# Every --config file flag (ml_collections' DEFINE_config_file) of every CLI loads through load_config_file.
config_flags.ConfigFileFlagParser.parse = _parse_config_file


def parse_flags(argv):
  """absl's flag parsing with one-line errors and exit status 2 (absl exits 1 and ml_collections raises a traceback
  for an unknown field)."""
  try:
    return flags.FLAGS(argv)
  except errors.UserError as e:  # A config file that cannot be loaded (load_config_file).
    fail(e)
  except flags.Error as e:
    fail(f"{e} (see --helpfull)")
  except (AttributeError, KeyError) as e:
    message = _unknown_config_field(argv, e)
    if message is None:
      raise
    fail(message)


def _thread_excepthook(default):
  """A background writer (an async checkpoint save, ...) that dies for the disk says so in one line; the main thread
  then reports the same fault as the error. Other thread exceptions are bugs: the default hook prints them."""
  def hook(args):
    reason = errors.os_error_reason(args.exc_value)
    if reason is None:
      default(args)
    else:
      print(f"warning: {args.thread.name if args.thread else 'a thread'} stopped: {reason} ({args.exc_value})",
            file=sys.stderr, flush=True)
  return hook


class _NoTracebackForUserFaults(logging_std.Filter):
  """Libraries that log an exception of their own threads (orbax's futures: a full disk, a checkpoint path that is a
  file) would print its traceback before our one `error:` line: for a fault the user can fix, keep the log line, drop
  the traceback."""

  def filter(self, record):
    if record.exc_info and record.exc_info[1] is not None and errors.os_error_reason(record.exc_info[1]):
      record.exc_info, record.exc_text = None, None
    return True


def run(main):
  threading.excepthook = _thread_excepthook(threading.excepthook)
  absl_logging.get_absl_handler().addFilter(_NoTracebackForUserFaults())
  app.run(guard(main), flags_parser=parse_flags)


def define_step_flag():
  """--step: which checkpoint of a run to use (latest, best by checkpoint.keep_best, or a step number)."""
  return flags.DEFINE_string("step", "latest", "Checkpoint to use: latest (the newest that restores intact), best "
                             "(the run's best by checkpoint.keep_best) or a step number.")


def step_value(value: str) -> str | int:
  """The --step flag as restore_params takes it: "latest", "best" or an int."""
  if value in STEP_CHOICES:
    return value
  if value.isdigit():
    return int(value)
  raise errors.UserError.at(f"bad --step {value!r}", "--step", "give latest, best or a step number")


def check_output_file(path: str, flag: str) -> None:
  """Before any work: the directory an output file goes into must exist (a typo should not cost a model load)."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise errors.UserError.at("the output is a directory", f"{flag}={path}", "give a file path")
  if not os.path.isdir(parent):
    raise errors.UserError.at("the output's directory does not exist", f"{flag}={path}",
                              f"create {parent} first or choose another path")
