"""Every test sees 8 fake CPU devices, so mesh and sharding tests run on a laptop or CI. pytest's own: tests never
import it (shared code is in tests/helpers.py), they get its fixtures."""

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Stdlib only at its top, so it can be imported before jax is configured here.
from tests.helpers import FAST_COMPILE_XLA_FLAGS, libtpu_pin, pinned_venv  # noqa: E402

# Tests compile hundreds of tiny programs and run most of them a few times, so compile time is what they spend: LLVM's
# optimizations off and XLA:CPU's older fusion emitters (tests/helpers.py FAST_COMPILE_XLA_FLAGS).
if FAST_COMPILE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # Once per process (a subprocess inherits them).
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

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()  # grain's multiprocess prefetch reads absl flags.


@pytest.fixture
def tiny_config():
  from experiments.configs import tiny
  return tiny.get_config()


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


@pytest.fixture(scope="module")
def tpu_python() -> str:
  """A python that can compile for TPU topologies (docs/scaling.md): this one where libtpu is installed (a TPU VM),
  else .venv-tpu, the test venv plus libtpu only. Only one process may load libtpu at a time: the tests that use it
  live in one file (tests/test_compile_check.py), which pytest.ini's --dist loadfile keeps on one worker."""
  if importlib.util.find_spec("libtpu") is not None:
    return sys.executable
  pin = libtpu_pin()
  return pinned_venv(".venv-tpu", ["--no-deps", pin], pin, inherit_main_venv=True)


# CI runs the suite on 2 workers, one test file per worker at a time (pytest.ini: --dist loadfile and
# --no-loadscope-reorder). A heavy file handed out last leaves the other worker idle while it runs, so the heaviest
# files go first (longest-first scheduling), then the rest by test count as xdist would order them. Seconds summed per
# file, measured on a clean clone with a cold compile cache (.ci/run, 2026-12-08): re-measure with --durations=0
# after a big change; an out-of-date list only costs balance, never correctness.
HEAVIEST_FILES_FIRST = (
    "test_compile_check.py", "test_checkpoint_faults.py", "test_train_step.py", "test_end_to_end.py",
    "test_candidate_head.py", "test_fail_safe.py", "test_gguf.py", "test_serve.py", "test_feature_cache.py",
    "test_engine.py", "test_length_rules_run.py", "test_launchers.py", "test_guided.py", "test_policy_rollouts.py",
    "test_censored_targets.py", "test_reproduce.py", "test_model.py", "test_bench.py", "test_sweep.py",
    "test_flag_relations.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVIEST_FILES_FIRST)}
  count = {}
  for item in items:
    count[item.path.name] = count.get(item.path.name, 0) + 1
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path.name], item.path.name))
