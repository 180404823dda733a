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

import pathlib  # noqa: E402
import sys  # noqa: E402

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
