"""Every test sees 8 fake CPU devices, so mesh and sharding tests run on a laptop or CI."""

import os

# Tests compile hundreds of tiny programs and run most of them a few times, so compile time is what they spend: LLVM's
# optimizations off (a cold full run: 1068 s -> 831 s on 2 cores) and XLA:CPU's older fusion emitters (compiling
# test_train_step's split test: 21 s -> 9 s; alone, without -O0, they are slower). Tests that run many steps take
# both off (optimized_env).
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                          "--xla_cpu_use_fusion_emitters=false")
if FAST_COMPILE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # Once, though tests import this module again.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " +
                             FAST_COMPILE_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests (and the CLIs they start as subprocesses, which inherit this) compile the same tiny model's steps: a
# persistent compilation cache shared by the xdist workers compiles each program once per checkout, which made a
# trainer test 4x faster warm (38 s -> 9 s). A size limit turns on jax's LRU eviction, whose file lock keeps one
# worker from reading an entry the other is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import fcntl  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()  # grain's multiprocess prefetch reads absl flags.


@pytest.fixture
def tiny_config():
  from experiments.configs import tiny
  return tiny.get_config()


def optimized_env() -> dict:
  """The environment for a subprocess that runs many steps: XLA's full optimization, as users get it."""
  return dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(FAST_COMPILE_XLA_FLAGS, "").strip())


def run_config(config):
  """The typed RunConfig of an ml_collections config, as the entry points build it (lenvm_jax/config.py)."""
  from lenvm_jax.config import RunConfig
  return RunConfig.from_dict(config)


@pytest.fixture
def fresh_compiles():
  """This test's compiles bypass the persistent compilation cache: for tests that read what the compiler logs."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


def pinned_venv(name: str, pip_args: list[str], stamp_text: str, inherit_main_venv: bool = False) -> str:
  """The python of a venv at REPO/<name> (ignored by git), built once with `pip install <pip_args>` and reused while
  stamp_text (what it was built from) is unchanged. inherit_main_venv: it also sees the test venv's packages (a .pth
  file), so it only adds what pip_args name.

  pytest-xdist runs fixtures once per worker, so building holds an exclusive lock: without it two workers built the
  same venv at once and one failed ("Directory not empty: 'site-packages'").
  """
  venv = REPO / name
  python = venv / "bin" / "python"
  digest = hashlib.sha256(f"{stamp_text}|{inherit_main_venv}|{sys.prefix}".encode()).hexdigest()
  stamp = venv / "built-from.sha256"
  with open(REPO / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes; a second worker waits, then finds the stamp.
    if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
      subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
      if inherit_main_venv:
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        pathlib.Path(site, "main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
      # --no-compile: byte-compiling every package took 19 of the launcher venv's 50 s; few modules are imported.
      subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", *pip_args], check=True, timeout=900)
      stamp.write_text(digest)
  return str(python)


def libtpu_pin() -> str:
  """The libtpu requirement of requirements-tpu.txt (the one place it is pinned)."""
  lines = (REPO / "requirements-tpu.txt").read_text().splitlines()
  return next(line.split("#")[0].strip() for line in lines if line.startswith("libtpu=="))


@pytest.fixture(scope="module")
def tpu_python() -> str:
  """A python that can compile for TPU topologies (docs/scaling.md): this one where libtpu is installed (a TPU VM),
  else .venv-tpu, the test venv plus libtpu only. Only one process may load libtpu at a time: the tests that use it
  live in one file (tests/test_compile_check.py), which pytest.ini's --dist loadfile keeps on one worker."""
  if importlib.util.find_spec("libtpu") is not None:
    return sys.executable
  pin = libtpu_pin()
  return pinned_venv(".venv-tpu", ["--no-deps", pin], pin, inherit_main_venv=True)


def run_cli(module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m experiments.<module> args...` from the repository root, its output captured."""
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, *needles) -> str:
  """A user's mistake as the CLIs report it: exit 2, no traceback, stderr ending in one `error:` line that holds
  every needle. Returns that line."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), last
  for needle in needles:
    assert needle in last, (needle, last)
  return last
