"""The accelerator check, ready to run: one command on whatever accelerator JAX finds, under 8 minutes, one JSON out.

  python -m experiments.device_check --output=device_check.json       # On the TPU / GPU host.
  python -m experiments.device_check --tiny --output=check.json  # Tiny shapes: seconds on CPU (the test).

(1) bench: the matmul peak, our compiled train step's tokens/s and MFU against that peak, and, where PyTorch runs
    on this device (CPU, or CUDA with a CUDA build of torch), the same model, batches and loss in eager PyTorch
    (experiments/bench_parts.py, as experiments/bench.py; the --tiny run skips PyTorch).
(2) attention: the attention kernel of this platform (model/attention.py: splash on TPU, the Pallas GPU kernel on
    GPU, interpret mode on CPU) against the XLA attention on the device: relative error of the output-weighted loss
    and its gradients (params and input) on packed rows with padding and grouped-query heads, in float32, and the
    time of one forward + backward of each.
(3) guided decoding: time per token of plain sampling and of Equal-To guided sampling (k candidates, one shared
    trunk), and their ratio.

Every part is timed; a part that raises is recorded with its error and the next one still runs; a part that would
start after --time_budget_s is skipped. Sizes are fixed below (FULL / TINY), so two devices' JSONs compare.
"""

import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from experiments import bench_parts, cli
from lenvm_jax import sharding
from lenvm_jax.data.synthetic import EOS_ID  # A random model speaks the synthetic ids: 0 pad, 1 EOS, prompts >= 2.
from lenvm_jax.decoding import candidate_scoring
from lenvm_jax.decoding.generation import GuidedSampler
from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.sampler import SamplingConfig
from lenvm_jax.model import attention as attention_kernels
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import Attention, LengthValueModel, attention_mask, rotary_tables
from lenvm_jax.value.targets import TargetKind

_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes (seconds on CPU), to test this script.")
_OUTPUT = cli.output_flag("Where to write the JSON.", "device_check.json")
_BUDGET = flags.DEFINE_float("time_budget_s", 420.0, "Skip the parts that would start after this many seconds.")

# Accelerator sizes: a Qwen2.5-1.5B-wide model cut to 4 layers (compiles in about a minute), 2048-token rows.
FULL = {
    "bench": dict(preset="qwen2.5-1.5b", shape={"num_layers": 4}, seq_len=2048, batch=8, accum_steps=1,
                  steps=3, rounds=3, matmul_size=8192, torch=True),
    "attention": dict(seq_len=2048, hidden_size=1536, num_heads=12, num_kv_heads=2, head_dim=128, block=512),
    "guided": dict(preset="qwen2.5-0.5b", num_layers=4, vocab_size=32768, batch=16, prompt_len=64, new_tokens=128,
                   candidates=5),
}
TINY = {
    "bench": dict(preset="tiny", shape={"hidden_size": 64, "head_dim": 16, "mlp_dim": 128}, seq_len=64, batch=4,
                  accum_steps=1, steps=1, rounds=1, matmul_size=256, torch=False),
    "attention": dict(seq_len=128, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=64, block=128),
    "guided": dict(preset="tiny", num_layers=2, vocab_size=64, batch=2, prompt_len=4, new_tokens=4, candidates=3),
}


def _best_seconds(fn, repeats: int = 3) -> float:
  jax.block_until_ready(fn())  # Compile.
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return float(best)


def run_bench(preset, shape, seq_len, batch, accum_steps, steps, rounds, matmul_size, torch) -> dict:
  """Part (1), through experiments/bench_parts.py: peak, our step, the PyTorch baseline where it runs."""
  config = bench_parts.make_bench_config(preset, shape, seq_len, batch, accum_steps, "auto")
  model_config = config.model
  peak = bench_parts.matmul_peak(matmul_size, model_config.compute_dtype)
  data = bench_parts.batches(config, bench_parts.WARMUP + steps)
  initial_params, first_loss, xla_flops, our_step = bench_parts.ours_runner(config, model_config, data)
  runners = {"ours": our_step}
  device, torch_note = bench_parts.torch_device(jax.default_backend()) if torch else ("", "skipped (--tiny)")
  if device:
    torch_loss, runners["torch"] = bench_parts.torch_runner(config, model_config, initial_params, data, device,
                                                            os.cpu_count())
  seconds = bench_parts.timed_rounds(runners, steps, rounds)
  step_s = float(np.median(seconds["ours"]))
  tokens_per_s = batch * seq_len / step_s
  model_flops = bench_parts.model_flops_per_token(model_config, seq_len) * tokens_per_s
  out = {"model": {"preset": preset, **shape, "dtype": jnp.dtype(model_config.compute_dtype).name},
         "seq_len": seq_len, "batch": batch, "matmul_peak_flops": peak, "step_seconds": step_s,
         "tokens_per_s": tokens_per_s, "model_flops_per_s": model_flops, "xla_flops_per_s": xla_flops / step_s,
         "mfu": model_flops / peak, "first_loss": first_loss}
  if device:
    torch_s = float(np.median(seconds["torch"]))
    out["torch"] = {"device": device, "step_seconds": torch_s, "tokens_per_s": batch * seq_len / torch_s,
                    "first_loss": torch_loss, "ours_over_torch": torch_s / step_s}
  else:
    out["torch"] = {"skipped": torch_note}
  return out


def packed_rows(seq_len: int):
  """(segment_ids, positions) [2, T]: row 0 packs three sequences, row 1 is one sequence then padding."""
  cuts = [0, int(0.4 * seq_len), int(0.7 * seq_len), seq_len]
  segments = np.zeros((2, seq_len), np.int32)
  positions = np.zeros((2, seq_len), np.int32)
  for i, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
    segments[0, start:end], positions[0, start:end] = i + 1, np.arange(end - start)
  real = int(0.8 * seq_len)
  segments[1, :real], positions[1] = 1, np.arange(seq_len)
  return jnp.asarray(segments), jnp.asarray(positions)


def run_attention(seq_len, hidden_size, num_heads, num_kv_heads, head_dim, block) -> dict:
  """Part (2): the platform's kernel against the XLA attention, float32, forward + gradients, and their times."""
  impl = {"tpu": "splash", "gpu": "pallas_gpu"}.get(sharding.target_platform(), "splash")  # CPU: interpret mode.
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "hidden_size": hidden_size,
                          "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
                          "dtype": "float32", "attention_block_q": block, "attention_block_kv": block})
  graphdef, params = nnx.split(Attention(config, nnx.Rngs(0)))
  segments, positions = packed_rows(seq_len)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, seq_len, hidden_size)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32) * (segments != 0)[..., None]
  rope = rotary_tables(positions, head_dim, config.rope_theta)

  def loss_and_grads(kind):
    def loss(params, x):
      mask = attention_mask(segments) if kind == "xla" else None
      return jnp.sum(nnx.merge(graphdef, params)(x, rope, mask, segments, kind) * weights)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  with jax.default_matmul_precision("highest"):
    reference_fn, kernel_fn = loss_and_grads("xla"), loss_and_grads(impl)
    reference, kernel = reference_fn(params, x), kernel_fn(params, x)
    times = {"xla_seconds": _best_seconds(lambda: reference_fn(params, x)),
             f"{impl}_seconds": _best_seconds(lambda: kernel_fn(params, x))}
  errors = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(a)))), 1e-30))
            for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(kernel))]
  # 1e-5 where float32 is exact (CPU interpret); the accelerators' matmul units round float32 inputs (TF32 in
  # Triton dots), so there the bar is 1e-2.
  tolerance = 1e-5 if jax.default_backend() == "cpu" else 1e-2
  return {"kernel": impl, "interpret": attention_kernels.KERNEL_PLATFORMS[impl] != sharding.target_platform(),
          "seq_len": seq_len, "heads": f"{num_heads}/{num_kv_heads}x{head_dim}", "max_relative_error": max(errors),
          "tolerance": tolerance, "ok": max(errors) <= tolerance, **times}


def run_guided(preset, num_layers, vocab_size, batch, prompt_len, new_tokens, candidates) -> dict:
  """Part (3): plain vs Equal-To guided sampling (shared trunk, next-state scorer), time per generated token."""
  config = ModelConfig(**{**preset_fields(preset), "num_layers": num_layers, "vocab_size": vocab_size})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LengthValueModel(config, nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.split(LengthValueModel(config, nnx.Rngs(0)))[1].to_pure_dict())()
  mesh = sharding.make_mesh(1, 1, 1)
  sampling = SamplingConfig(max_new_tokens=new_tokens, eos_ids=(EOS_ID,), seed=0)
  prompts = np.random.default_rng(0).integers(2, vocab_size, size=(batch, prompt_len)).tolist()
  kind = TargetKind("discounted", 0.997, 1024.0)
  plain = Sampler(graphdef, params, sampling, mesh, batch_size=batch)
  guided = GuidedSampler(candidate_scoring.shared_trunk("next_state", graphdef, kind, config), params, sampling, mesh,
                         num_candidates=candidates, batch_size=batch)
  requests = [LengthRequest("equal_to", new_tokens)] * batch

  def per_token(generate):
    generate()  # Compile.
    best = np.inf
    for _ in range(2):
      start = time.perf_counter()
      steps = max(len(s.completion_ids) for s in generate())
      best = min(best, (time.perf_counter() - start) / (steps * batch))
    return float(best)

  plain_s = per_token(lambda: plain.generate(prompts))
  guided_s = per_token(lambda: guided.generate(prompts, requests))
  return {"model": {"preset": preset, "num_layers": num_layers, "vocab_size": vocab_size}, "batch": batch,
          "new_tokens": new_tokens, "candidates": candidates, "plain_seconds_per_token": plain_s,
          "guided_seconds_per_token": guided_s, "guided_over_plain": guided_s / plain_s}


def main(argv):
  del argv
  cli.check_output_file(_OUTPUT.value, "--output")  # Before minutes of measurements.
  start = time.perf_counter()
  sizes = TINY if _TINY.value else FULL
  device = jax.devices()[0]
  report = {"device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                       "jax": jax.__version__},
            "mode": "tiny" if _TINY.value else "full", "parts": {}}
  for name, run in (("bench", run_bench), ("attention", run_attention), ("guided", run_guided)):
    begun = time.perf_counter() - start
    if begun > _BUDGET.value:
      report["parts"][name] = {"skipped": f"over the time budget ({begun:.0f} s > {_BUDGET.value:.0f} s)"}
      continue
    try:
      report["parts"][name] = run(**sizes[name])
    except Exception as e:  # pylint: disable=broad-except  (one failing part must not lose the others' numbers)
      report["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    report["parts"][name]["part_seconds"] = time.perf_counter() - start - begun
    print(f"{name}: {json.dumps(report['parts'][name], default=float)[:400]}", flush=True)
  report["total_seconds"] = time.perf_counter() - start
  with open(_OUTPUT.value, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=float)
  print(f"device check on {device.platform} ({device.device_kind}) in {report['total_seconds']:.0f} s -> "
        f"{_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
