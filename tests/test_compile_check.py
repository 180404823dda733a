import pytest
import re
import subprocess
import sys

from tests.conftest import REPO


@pytest.mark.slow
def test_real_shape_config_compiles_ahead_of_time_on_eight_fake_devices():
  """The Qwen2.5-1.5B-width config (2 of its 28 layers, to keep CI short) lowers and compiles on a 2x2x2 mesh."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.compile_check", "--config", "experiments/configs/qwen25_1p5b_aot.py",
       "--config.model.num_layers=2"], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu devices" in out
  # 2 layers of Qwen2.5-1.5B + embeddings + value head.
  assert re.search(r"model: 0\.3[0-9]{2}B parameters", out), out
  train = re.search(r"train step: per device: arguments ([0-9.]+) GiB.*temporaries ([0-9.]+) GiB", out)
  assert train and float(train.group(1)) > 0.1, out
