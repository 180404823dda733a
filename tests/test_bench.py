"""The benchmark runs all four parts, and its PyTorch baseline computes the same model and loss as our step."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, one_device_env


# bfloat16 (the accelerator default) runs the code path a GPU runs: our bf16 matmuls against PyTorch under autocast
# with a float32 value head. At initialisation the loss barely depends on the rounding (bf16 and float32 first-step
# losses differ by ~3e-5 here), so this checks that the path runs and computes the same loss, not its precision.
# The float32 run splits the batch into 2 micro-batches (gradient accumulation in both frameworks, the bench's
# default): the first-step losses agreeing to float32 rounding checks that both accumulate the whole batch's token
# mean (a mean of per-micro-batch means would differ).
@pytest.mark.slow
@pytest.mark.parametrize("dtype, accum, loss_rtol", [("float32", 2, 1e-4), ("bfloat16", 1, 1e-3)])
def test_bench_parts_and_same_first_loss(tmp_path, dtype, accum, loss_rtol):
  out = tmp_path / "bench.json"
  env = one_device_env()
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench", "--preset=tiny", "--hidden_size=64", "--num_layers=2",
       "--head_dim=16", "--mlp_dim=128", "--seq_len=64", "--batch=4", "--steps=1", "--rounds=2", "--matmul_size=256",
       "--torch_threads=1", f"--dtype={dtype}", f"--accum_steps={accum}",
       f"--json={out}"], cwd=REPO, env=dict(env, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["quantity"]: r["value"] for r in json.loads(out.read_text())}
  assert {r["part"] for r in json.loads(out.read_text())} == {"a", "b", "c", "d"}
  for name in (f"matmul peak (256^3 {dtype})", "ours: tokens/s (B x T)", "ours: MFU vs (a)", "pipeline: rows/s",
               "pipeline / step (headroom)"):
    assert rows[name] > 0, name
  # The analytic model FLOPs (used for MFU) agree with XLA's own count of the compiled step.
  assert rows["ours: XLA-counted FLOP/s"] == pytest.approx(rows["ours: model FLOP/s (6N + attention)"], rel=0.15)
  assert "(a) matmul peak" in result.stdout and "(d) pipeline / step" in result.stdout
  if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
    # Same initial weights (exported by hf_export), same batch, same loss: same first-step loss.
    assert rows["PyTorch: first-step loss (same weights, batch)"] == pytest.approx(rows["ours: first-step loss"],
                                                                                   rel=loss_rtol)
    ratio = rows["ours / PyTorch tokens/s (median of 2 rounds)"]
    assert 0 < rows["ours / PyTorch: lowest round"] <= ratio <= rows["ours / PyTorch: highest round"]
    # The ratio is of the same step times the table prints (medians over the same rounds, so within their spread).
    torch_s = rows[f"PyTorch (1 threads, {dtype}): step time (median of rounds)"]
    step_ratio = torch_s / rows["ours: step time (median of rounds)"]
    assert rows["ours / PyTorch: lowest round"] <= step_ratio <= rows["ours / PyTorch: highest round"]
