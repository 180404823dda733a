"""experiments/device_check.py, the script an accelerator host runs, in its tiny CPU mode: every part runs and the
JSON holds what docs/benchmarks.md says it does."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import FAST_COMPILE_XLA_FLAGS, REPO


@pytest.mark.slow
def test_device_check_runs_every_part_and_writes_one_json(tmp_path):
  out = tmp_path / "device_check.json"
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS, JAX_PLATFORMS="cpu")  # One CPU device: a one-chip host.
  result = subprocess.run([sys.executable, "-m", "experiments.device_check", "--tiny", f"--output={out}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["device"]["platform"] == "cpu" and report["mode"] == "tiny"
  parts = report["parts"]
  assert not [name for name, part in parts.items() if "error" in part or "skipped" in part], parts
  bench = parts["bench"]
  assert bench["tokens_per_s"] > 0 and 0 < bench["mfu"] < 1.5 and bench["matmul_peak_flops"] > 0
  attention = parts["attention"]
  assert attention["kernel"] == "splash" and attention["interpret"] and attention["ok"], attention
  assert attention["max_relative_error"] <= 1e-5
  guided = parts["guided"]
  assert guided["plain_seconds_per_token"] > 0 and guided["guided_over_plain"] > 0
  assert report["total_seconds"] < 480
