"""Every flag of every command-line tool, fed bad values: each ends in exit 2 and one `error:` line naming the flag.

The tools and their flags come from the code, not from a list here: every experiments/*.py whose entry point is
cli.run, and the absl flags that importing it registers (its own and the shared helpers', not the libraries'). A
new tool or flag is covered without editing this test. The values are bad by the flag's type alone (a non-number, an
empty value, NaN / inf, a negative or out-of-int32 count, 0 where the help gives 0 no meaning, an unknown enum value,
a config file that is missing or a directory); relations between flags are each tool's own checks (test_fail_safe).

One subprocess imports the tools one after another (unregistering each one's flags before the next, as their names
collide) and runs absl's parsing plus cli.check_flags on each case in-process: ~5 s for ~550 cases. The slow part
runs each tool's main on its path flags (missing, or a file where a directory is meant and the reverse).
"""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

TOOLS = sorted(p.stem for p in (pathlib.Path(REPO) / "experiments").glob("*.py")
               if "cli.run(" in p.read_text(encoding="utf-8") and p.stem != "cli")

_PROBE = r"""
import contextlib, importlib, io, json, sys
from absl import flags
tools, sys.argv = sys.argv[1:], sys.argv[:1]  # ml_collections defines config overrides from sys.argv: none here.
from experiments import cli

def kind(flag):
  return "enum" if hasattr(flag.parser, "enum_values") else flag.flag_type()

def placeholder(flag):
  return {"config object": "experiments/configs/tiny.py", "enum": (getattr(flag.parser, "enum_values", None) or
          [""])[0], "int": "1", "float": "0.5", "bool": "false"}.get(kind(flag), "/nonexistent/placeholder")

def bad_values(flag):
  k = kind(flag)
  if k == "int":
    return ["", "abc", "1.5", "nan", "-1", str(2**31)] + ([] if cli.zero_is_a_value(flag) else ["0"])
  if k == "float":
    return ["", "abc", "nan", "inf", "-inf", "1e999"]
  if k == "enum":
    return ["", "no_such_choice"]
  if k == "bool":
    return ["maybe"]
  if k == "config object":
    return ["", "/nonexistent/config.py", "experiments"]
  if isinstance(flag.default, list) and cli.numeric_list(flag):
    return ["nan", "abc", "1,inf"]
  if flag.default is None and k in ("string", "comma separated list of strings"):
    return [""]
  return []

results = []
for tool in tools:
  before = set(flags.FLAGS)
  importlib.import_module(f"experiments.{tool}")
  new = set(flags.FLAGS) - before
  own = [f for module, fs in flags.FLAGS.flags_by_module_dict().items() if cli.is_cli_module(module)
         for f in fs if f.name in new]
  for flag in own:
    for value in bad_values(flag):
      flags.FLAGS.unparse_flags()
      argv = [tool] + [f"--{p.name}={placeholder(p)}" for p in own if p.default is None and p is not flag]
      argv.append(f"--{flag.name}={value}" if kind(flag) != "bool" else f"--{flag.name}={value}")
      err = io.StringIO()
      code = None
      with contextlib.redirect_stderr(err):
        try:
          cli.parse_flags(argv)
        except SystemExit as e:
          code = e.code
        except BaseException as e:  # A traceback in the real tool.
          code = f"raised {type(e).__name__}: {e}"
      results.append({"tool": tool, "flag": flag.name, "kind": kind(flag), "value": value, "code": code,
                      "stderr": err.getvalue()})
  for name in {f.name for f in own}:  # The libraries' flags stay: the next tool's imports find them registered.
    delattr(flags.FLAGS, name)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fuzzed():
  result = subprocess.run([sys.executable, "-c", _PROBE, *TOOLS], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_tool_is_fuzzed_on_its_own_flags(fuzzed):
  assert len(TOOLS) >= 15 and {"train", "predict", "evaluate", "prepare_data"} <= set(TOOLS)
  tools = {r["tool"] for r in fuzzed}
  # A tool with no flag a bad value could reach would show up missing here.
  assert tools == set(TOOLS), set(TOOLS) - tools
  kinds = {r["kind"] for r in fuzzed}
  assert {"int", "float", "enum", "config object"} <= kinds, kinds
  names = {r["flag"] for r in fuzzed}
  assert not names & {"v", "verbosity", "logtostderr"} and not any(n.startswith(("grain_", "jax_")) for n in names)


def _failures(fuzzed):
  out = []
  for r in fuzzed:
    lines = r["stderr"].strip().splitlines()
    last = lines[-1] if lines else ""
    if r["code"] != 2 or "Traceback" in r["stderr"] or not last.startswith("error: ") or f"--{r['flag']}" not in last:
      out.append(f"{r['tool']} --{r['flag']}={r['value']!r}: exit {r['code']}, {last or r['stderr'][-300:]!r}")
  return out


def test_every_bad_flag_value_is_one_error_line_naming_the_flag(fuzzed):
  failures = _failures(fuzzed)
  assert not failures, f"{len(failures)} of {len(fuzzed)} cases:\n" + "\n".join(failures[:40])


# ------------------------------------------------------------------------------ path flags: main runs on them

# A flag whose help speaks of a file or a directory takes a path; the tool's main runs on a missing one and on one of
# the other kind (a file where its help says directory, else a directory), the other required flags given paths that
# do not exist (so a tool stops at its first check: the case must then be one error line or handled, never a
# traceback). Each case runs in a forked child of one process that imported the tool (no second import); one still
# running after 2 s finishes its 20 s in the background while the next cases run.
_PATH_PROBE = r"""
import contextlib, importlib, json, os, re, signal, sys, tempfile, time, traceback
from absl import flags
tools, sys.argv = sys.argv[1:], sys.argv[:1]
from experiments import cli
scratch = tempfile.mkdtemp()
a_file, a_dir = os.path.join(scratch, "a_file"), os.path.join(scratch, "a_dir")
open(a_file, "w").write("not what the tool reads\n")
os.mkdir(a_dir)
PATHY = re.compile(r"\b(file|directory|dir|workdir|path|folder)\b", re.I)

def kind(flag):
  return "enum" if hasattr(flag.parser, "enum_values") else flag.flag_type()

def placeholder(flag, case):
  return {"config object": "experiments/configs/tiny.py", "enum": (getattr(flag.parser, "enum_values", None) or
          [""])[0], "int": "1", "float": "0.5", "bool": "false"}.get(kind(flag), os.path.join(scratch, f"missing_{case}_"
                                                                                               + flag.name))

def required(flag):
  return any("must have a value other than None" in getattr(v, "message", "") for v in flag.validators)

def start_case(module, argv, out):
  pid = os.fork()
  if pid == 0:
    os.setpgid(0, 0)  # Its own process group: a tool that starts trainers (sweep, reproduce) is stopped whole.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    code = 1
    try:
      flags.FLAGS.unparse_flags()
      remaining = cli.parse_flags(argv)
      cli.guard(module.main)(remaining)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
  return pid

def poll_case(case):  # The case's result once it exited or ran past its 20 s (then stopped), else None.
  done, status = os.waitpid(case["pid"], os.WNOHANG)
  if done:
    code = os.waitstatus_to_exitcode(status)
  elif time.time() > case["deadline"]:  # Past its checks and working on the path (an output it may create): handled.
    os.killpg(case["pid"], signal.SIGKILL)
    os.waitpid(case["pid"], 0)
    code = "working"
  else:
    return None
  with contextlib.suppress(ProcessLookupError):  # Anything the tool started, if it left early.
    os.killpg(case["pid"], signal.SIGKILL)
  return {**case["record"], "code": code, "output": open(case["out"], errors="replace").read()[-2000:]}

# A case still running after 2 s waits in the background for the rest of its 20 s while the next cases run (each its
# own paths), so the few that work on their path until stopped cost 20 s together, not 20 s each.
results, waiting = [], []

def reap(until_done=False):
  while True:
    for case in list(waiting):
      result = poll_case(case)
      if result is not None:
        waiting.remove(case)
        results.append(result)
    if not (until_done and waiting):
      return
    time.sleep(0.05)

def run_case(module, argv, record):
  n = len(results) + len(waiting)
  case = {"pid": start_case(module, argv, os.path.join(scratch, f"out_{n}.txt")), "deadline": time.time() + 20,
          "out": os.path.join(scratch, f"out_{n}.txt"), "record": record}
  until = time.time() + 2
  while time.time() < until:
    result = poll_case(case)
    if result is not None:
      results.append(result)
      return
    time.sleep(0.05)
  waiting.append(case)

for tool in tools:
  before = set(flags.FLAGS)
  module = importlib.import_module(f"experiments.{tool}")
  new = set(flags.FLAGS) - before
  own = [f for m, fs in flags.FLAGS.flags_by_module_dict().items() if cli.is_cli_module(m) for f in fs
         if f.name in new]
  for flag in own:
    if flag.default is not None or kind(flag) not in ("string", "comma separated list of strings"):
      continue
    if not PATHY.search(flag.help or ""):
      continue
    wants_dir = bool(re.search(r"\b(directory|dir|workdir|folder)\b", flag.help, re.I))
    for label in ("missing", "a_file" if wants_dir else "a_dir"):
      # Each case's missing paths its own: a tool that works on one creates it, and the next case's must be missing.
      case = len(results) + len(waiting)
      value = os.path.join(scratch, f"missing_{case}" if label == "missing" else label)
      argv = [tool] + [f"--{p.name}={placeholder(p, case)}" for p in own if required(p) and p is not flag]
      argv.append(f"--{flag.name}={value}")
      run_case(module, argv, {"tool": tool, "flag": flag.name, "value": label})
      reap()
  for name in {f.name for f in own}:  # The libraries' flags stay: the next tool's imports find them registered.
    delattr(flags.FLAGS, name)
reap(until_done=True)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_path_flags_given_a_missing_path_or_the_wrong_kind_are_one_line_or_handled():
  result = subprocess.run([sys.executable, "-c", _PATH_PROBE, *TOOLS], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  cases = json.loads(result.stdout.strip().splitlines()[-1])
  assert {"workdir", "input", "data_dir", "policy"} <= {r["flag"] for r in cases}
  failures = []
  for r in cases:
    lines = r["output"].strip().splitlines()
    last = lines[-1] if lines else ""
    if r["code"] not in (0, 2, "working") or "Traceback" in r["output"] or (r["code"] == 2 and
                                                                               not last.startswith("error: ")):
      failures.append(f"{r['tool']} --{r['flag']}=<{r['value']}>: exit {r['code']}, {last[:300]!r}")
  assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
