"""Many calls of one command-line tool, each as `python -m experiments.<tool> args...` runs it: cli.run(main) on its
argv in a process of its own (its exit status, stdout and stderr), but forked from a server process per tool that
imported python, jax and the tool once. A test that runs a tool a few times (one bad flag per call, each checked on
its own exit status and error line) pays those imports (~4 s of CPU) once instead of per call.

Stdlib only, like tests/helpers.py (conftest.py's environment is set before jax loads). A module-scoped fixture holds
one CliServers per test file: `servers = CliServers(tmp_dir); yield servers; servers.close()`.
"""

import json
import subprocess
import sys

from tests.helpers import REPO

_SERVER = r"""
import atexit, importlib, json, os, signal, sys, tempfile, time, traceback
tool, sys.argv = sys.argv[1], sys.argv[:1]
from experiments import cli
module = importlib.import_module(f"experiments.{tool}")
scratch = tempfile.mkdtemp()
replies = os.fdopen(os.dup(1), "w")  # Not inherited by what a call execs.
for request in sys.stdin:
  argv, timeout = json.loads(request)
  out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
  pid = os.fork()
  if pid == 0:
    os.setpgid(0, 0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, out), (2, err)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [module.__file__, *argv]  # What `python -m` sets.
    code = 1
    try:
      cli.run(module.main)
      code = 0
    except SystemExit as e:  # As the interpreter ends on it.
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
    except BaseException:
      traceback.print_exc()
    try:
      atexit._run_exitfuncs()
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os._exit(code)
  deadline, code = time.time() + timeout, None
  while code is None:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      code = os.waitstatus_to_exitcode(status)
    elif time.time() > deadline:
      os.killpg(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      code = "timeout"
    else:
      time.sleep(0.02)
  with open(out, errors="replace") as o, open(err, errors="replace") as e:
    replies.write(json.dumps({"code": code, "stdout": o.read(), "stderr": e.read()}) + "\n")
  replies.flush()
"""


class CliServers:
  """run(tool, *args, timeout=...) -> subprocess.CompletedProcess, as tests/helpers.py's run_cli, through one server
  per tool (started at its first call; close() stops them)."""

  def __init__(self, scratch):
    self._scratch, self._servers = scratch, {}

  def run(self, module, *args, timeout=300):
    if module not in self._servers:
      log = open(self._scratch / f"{module}.log", "w+")
      self._servers[module] = (subprocess.Popen([sys.executable, "-c", _SERVER, module], cwd=REPO, text=True,
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log), log)
    server, log = self._servers[module]
    server.stdin.write(json.dumps([list(map(str, args)), timeout]) + "\n")
    server.stdin.flush()
    reply = server.stdout.readline()
    if not reply:
      log.seek(0)
      raise AssertionError(f"the {module} server died: {log.read()[-3000:]}")
    reply = json.loads(reply)
    if reply["code"] == "timeout":
      raise subprocess.TimeoutExpired(module, timeout)
    return subprocess.CompletedProcess([module, *args], reply["code"], reply["stdout"], reply["stderr"])

  def close(self):
    for server, log in self._servers.values():  # Idle between calls, nothing to flush: not worth its exit.
      server.kill()
      server.wait()
      log.close()
