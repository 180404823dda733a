"""Every test sees 8 fake CPU devices, so mesh and sharding tests run on a laptop or CI."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def run_config(config):
  """The typed RunConfig of an ml_collections config, as the entry points build it (lenvm_jax/config.py)."""
  from lenvm_jax.config import RunConfig
  return RunConfig.from_dict(config)
