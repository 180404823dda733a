"""The error boundary that every command-line tool in experiments/ runs under: `cli.run(main)` instead of app.run.

What a user can cause (a flag, a config field, a path, a permission, a full or read-only disk, bad data, a checkpoint
that is missing, corrupt or of another model, a busy workdir) ends as one line on stderr, `error: <message>`, and
exit status 2. Any other exception is a bug and keeps its traceback (exit status 1).

Also the flag registry (run_flags, batch_size_flag, seed_flag, output_flag, preset_flag, max_shard_flag): the flags
several tools share, defined once. Over ~350 lines because both are what every tool imports first, one module each
tool already names.
"""

import contextlib
import dataclasses
import functools
import importlib
import importlib.machinery
import logging as logging_std
import math
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

from lenvm_jax import errors, progress

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
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except  # Anything the file raises (SyntaxError, exit).
    raise errors.UserError(f"config file {file}{_line_in(e, path)}: {type(e).__name__}: {e}; fix the file") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise errors.UserError.at("the config file has no get_config()", where,
                              "define get_config() returning the config (see experiments/configs/)")
  try:
    config = get_config(*args)
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    fix = f"give an argument after ':' that get_config takes, or fix {file}" if args else "fix the file"
    raise errors.UserError(f"config file {file}{_line_in(e, path)}: get_config({', '.join(map(repr, args))}) "
                           f"raised {type(e).__name__}: {e}; {fix}") from None
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


INT_LIMIT = 2**31 - 1  # Counts, sizes and seeds beyond int32 are a typo (and overflow the arrays they size).
# Help text that gives 0 a meaning ("0 = all", "0 keeps it", "(0 = the real devices)"): there 0 is a value, elsewhere
# an integer flag counts something and 0 is refused.
_ZERO_MEANS = re.compile(r"(?<![\d.])0\s*(=|:|keeps|means|is\b|for\b|\))|\(0\b")


def is_cli_module(module: str) -> bool:
  """Whether absl's flag-defining `module` (a dotted name, or the path of a script run as __main__) is a tool of
  experiments/ or its shared flag helpers, not a library (grain, orbax, absl define flags of their own)."""
  return (module == "__main__" or module.startswith("experiments.") or module.startswith("experiments" + os.sep)
          or f"{os.sep}experiments{os.sep}" in module)


def zero_is_a_value(flag) -> bool:
  """0 means something for this integer flag: its default, or its help says what 0 does, or it is a seed / id."""
  return flag.default == 0 or bool(_ZERO_MEANS.search(flag.help or "")) or bool(re.search(r"(^|_)(seed|id)$",
                                                                                            flag.name))


def _number(text: str) -> float | None:
  try:
    return float(text)
  except (TypeError, ValueError):
    return None


def numeric_list(flag) -> bool:
  """A list flag whose default items are all numbers: every item given must be a finite number too."""
  return (isinstance(flag.default, list) and bool(flag.default)
          and all(_number(item) is not None for item in flag.default))


def flag_problem(flag) -> str | None:
  """What is wrong with the value a user gave `flag`, by its type alone (the tools check their own relations):
  a float that is not finite; an integer that is negative, beyond int32, or 0 where 0 means nothing; a numeric list
  item that is not a finite number; an empty value for a flag without a default."""
  value, kind = flag.value, flag.flag_type()
  if kind == "float" and value is not None and not math.isfinite(value):
    return "must be a finite number"
  if kind == "int" and value is not None:
    if value < 0:
      return "must be >= 0"
    if value > INT_LIMIT:
      return f"must be at most {INT_LIMIT}"
    if value == 0 and not zero_is_a_value(flag):
      return "must be positive"
  if isinstance(value, list) and numeric_list(flag):
    for item in value:
      number = _number(item)
      if number is None or not math.isfinite(number):
        return f"item {item!r} is not a finite number"
  if flag.default is None and value in ("", []):
    return "is empty"
  return None


def check_flags(flag_values=flags.FLAGS) -> None:
  """The generic schema every tool's flags pass before its main runs (see flag_problem); raises a UserError that
  names the flag."""
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if not is_cli_module(module):
      continue
    for flag in module_flags:
      if flag.present and (problem := flag_problem(flag)):
        value = ",".join(flag.value) if isinstance(flag.value, list) else flag.value
        raise errors.UserError(f"--{flag.name}={value}: {problem} (see --help)")


def parse_flags(argv):
  """absl's flag parsing with one-line errors and exit status 2 (absl exits 1 and ml_collections raises a traceback
  for an unknown field), then the generic checks of check_flags."""
  try:
    remaining = flags.FLAGS(argv)
    check_flags()
    return remaining
  except errors.UserError as e:  # A config file that cannot be loaded (load_config_file), a bad flag value.
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


def libraries_verbose() -> bool:
  """Whether the command line asked for the libraries' INFO records: --verbosity given, at 0 (INFO) or above."""
  verbosity = flags.FLAGS["verbosity"]
  return bool(verbosity.present) and verbosity.value >= 0


class _QuietLibraries(logging_std.Filter):
  """Console output for a person: below WARNING, only this project's records (lenvm_jax/, experiments/) reach the
  console; the libraries' INFO chatter (orbax: ~30 lines per restore; absl, grain, jax) shows when --verbosity is
  given (0: their INFO too, 1: DEBUG as well, absl's levels).
  Also drops the few library warnings that our own calls make certain (a read-only checkpoint manager for a restore).
  Any record that passes first erases a progress line drawn in place (lenvm_jax/progress.py)."""

  _OURS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (errors.__file__, __file__))
  _EXPECTED_WARNINGS = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                        'Item "data_iter" was found in the checkpoint, but could not be restored')

  def filter(self, record):
    if not libraries_verbose() and not os.path.abspath(record.pathname).startswith(self._OURS):
      if record.levelno < logging_std.WARNING:
        return False
      if record.levelno == logging_std.WARNING and record.getMessage().startswith(self._EXPECTED_WARNINGS):
        return False
    progress.clear_active_line()
    return True


def run(main):
  threading.excepthook = _thread_excepthook(threading.excepthook)
  absl_logging.get_absl_handler().addFilter(_NoTracebackForUserFaults())
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(guard(main), flags_parser=parse_flags)


def console_main():
  """The entry point of the console scripts (pyproject.toml): `lenvm-<tool>` runs experiments/<tool>.py ('-' -> '_')
  as `python -m experiments.<tool>` does."""
  tool = os.path.basename(sys.argv[0]).removeprefix("lenvm-").removesuffix(".exe").replace("-", "_")
  try:
    module = importlib.import_module(f"experiments.{tool}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{tool}":
      raise
    fail(f"{sys.argv[0]}: no tool experiments/{tool}.py (the console scripts are named lenvm-<tool>)")
  for flag in flags.FLAGS.get_key_flags_for_module(module):  # --help lists the main module's: the tool's.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  run(module.main)


# The flag registry: the groups that several tools share (run selection, batching, seed, output; sampling and
# guidance in experiments/sampling_flags.py), defined here once so every tool gets the same names, defaults and
# checks. A tool calls each group once at import and keeps the handles it returns; the flags count as the tool's own
# (its --help lists them: disclaim_key_flags below).

RUN_HELP = "Training workdir (config.json + checkpoints)."
flags.disclaim_key_flags()  # The flags this module defines from here on are the calling tool's key flags.


@dataclasses.dataclass(frozen=True)
class RunFlags:
  """Handles of the run selection group: --workdir and (for the tools that read a checkpoint) --step."""
  workdir: flags.FlagHolder
  step: flags.FlagHolder | None = None

  def step_value(self) -> str | int | None:
    """--step as restore_params takes it (None without the flag: the Predictor's default, the latest)."""
    return step_value(self.step.value) if self.step is not None else None


def run_flags(workdir_help: str = RUN_HELP, *, step: bool = True, required: bool = True) -> RunFlags:
  """--workdir (a run directory; required unless told) and --step (which of its checkpoints)."""
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  if required:
    flags.mark_flag_as_required("workdir")
  return RunFlags(workdir, define_step_flag() if step else None)


def load_predictor(run: RunFlags, workdir: str | None = None):
  """The Predictor of the selected run and checkpoint (`workdir` overrides --workdir: a run the tool made)."""
  from lenvm_jax.decoding.predict import Predictor  # pylint: disable=g-import-not-at-top  (jax: only when used)
  return Predictor(workdir or run.workdir.value, run.step_value())


def batch_size_flag(default: int, help_text: str = "Sequences per forward pass."):
  """--batch_size: rows processed together (each tool keeps its own default: its memory / speed trade-off)."""
  return flags.DEFINE_integer("batch_size", default, help_text)


def seed_flag(default: int = 0, help_text: str = "Sampling seed."):
  """--seed."""
  return flags.DEFINE_integer("seed", default, help_text)


def output_flag(help_text: str, default: str | None = None, *, required: bool = False):
  """--output: the file or directory a tool writes."""
  holder = flags.DEFINE_string("output", default, help_text)
  if required:
    flags.mark_flag_as_required("output")
  return holder


def preset_flag(default: str | None = "small", help_text: str = "Model preset (lenvm_jax/model_config.py PRESETS)."):
  """--preset: the model shape of a tool that builds its own run."""
  return flags.DEFINE_string("preset", default, help_text)


def max_shard_flag():
  """--max_shard_size_gb: safetensors shard size of an exported Hugging Face model (positive)."""
  from lenvm_jax.model import hf_export  # pylint: disable=g-import-not-at-top  (jax: only the exporting tools)
  holder = flags.DEFINE_float("max_shard_size_gb", hf_export.DEFAULT_MAX_SHARD_BYTES / 1e9,
                              "Split the weights into safetensors shards of at most this size (+ index).")
  flags.register_validator("max_shard_size_gb", lambda gb: gb > 0, "must be a positive size in GB")
  return holder


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


def int_list(flag: str, values) -> tuple[int, ...]:
  """A list flag's items as ints (token ids, budgets); an item that is none is the user's, naming the flag."""
  try:
    return tuple(int(v) for v in values or ())
  except ValueError:
    raise errors.UserError(f"--{flag}={','.join(values)}: expected comma-separated integers (see --help)") from None


def check_output_file(path: str, flag: str) -> None:
  """Before any work: the directory an output file goes into must exist (a typo should not cost a model load)."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise errors.UserError.at("the output is a directory", f"{flag}={path}", "give a file path")
  if not os.path.isdir(parent):
    raise errors.UserError.at("the output's directory does not exist", f"{flag}={path}",
                              f"create {parent} first or choose another path")
