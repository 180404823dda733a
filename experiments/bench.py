"""Throughput benchmark: matmul peak, our train step (tokens/s, model FLOP/s, MFU), a PyTorch baseline, data pipeline.

  python -m experiments.bench [--preset=small --hidden_size=256 --num_layers=4 --seq_len=256 --batch=8
                               --accum_steps=2 --dtype=auto --steps=2 --rounds=6]

(a) peak: the best FLOP/s of a square matmul through JAX in the compute dtype (float32 on CPU, bfloat16 on
    accelerators), so MFU is measured against what this machine really does, not a datasheet.
(b) ours: the trainer's compiled train step (lenvm_jax.train.step, AdamW, value-head regression on discounted
    targets, docs/method.md §6) on batches from our grain pipeline, split into --accum_steps micro-batches as the
    trainer splits them: tokens/s (B x T per step time), model FLOP/s from the standard count (6 x matmul params +
    attention, per token) and MFU = that / (a).
(c) PyTorch: the same model (our initial weights exported with lenvm_jax.model.hf_export and loaded by
    transformers), the same batches, micro-batches, loss and optimizer, in plain eager PyTorch; its tokens/s and
    ours / theirs.
    It runs where JAX runs: on CPU with --torch_threads threads, on a GPU as CUDA (needs a CUDA build of torch), and
    in our compute dtype: with bfloat16 (the accelerator default, or --dtype=bfloat16) its matmuls run under
    torch.autocast(bfloat16) while the value head and loss stay float32, as ours do (docs/method.md §3).
    The first-step losses of (b) and (c) are printed side by side: equal values show it is the same computation
    (to float32 rounding; less closely in bfloat16, where the two round different intermediates).
    Timing runs in rounds that alternate the two (--steps each); the ratio is the median of the per-round ratios,
    printed with the lowest and highest, so a slow phase of a shared machine cannot decide it.
    Needs requirements-parity.txt (torch==2.13.0 CPU, transformers); skipped with a note when absent, on a GPU
    when torch has no CUDA, and on TPU.
(d) data: rows/s and tokens/s that the grain pipeline (lenvm_jax/data/pipeline.py) produces for the same config,
    against what the step consumes.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import bench_parts, cli
from lenvm_jax import files
from lenvm_jax.data import pipeline

_PRESET = cli.preset_flag()
_HIDDEN = flags.DEFINE_integer("hidden_size", 256, "Overrides the preset; 0 keeps it.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Overrides the preset; 0 keeps it.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Overrides the preset; 0 keeps it.")
_MLP = flags.DEFINE_integer("mlp_dim", 768, "Overrides the preset; 0 keeps it.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Row length (data.max_len).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per step (train.batch_size).")
_ACCUM = flags.DEFINE_integer("accum_steps", 2, "Micro-batches per step in both frameworks (train.accum_steps).")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per framework per round (after 2 warm-up steps).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Rounds: each times --steps of ours, then of PyTorch (interleaved).")
_MATMUL = flags.DEFINE_integer("matmul_size", 0, "Peak matmul size; 0 = 2048 on CPU, 8192 on accelerators.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads on CPU; 0 = all cores.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype of both frameworks (model.dtype; auto: float32 on CPU, bfloat16 elsewhere).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Skip the PyTorch baseline.")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")


def bench_config():
  """make_bench_config from the flags."""
  shape = {"hidden_size": _HIDDEN.value, "num_layers": _LAYERS.value, "head_dim": _HEAD_DIM.value,
           "mlp_dim": _MLP.value}
  return bench_parts.make_bench_config(_PRESET.value, shape, _SEQ.value, _BATCH.value, _ACCUM.value, _DTYPE.value)


def bench_data(config, count: int) -> tuple[float, float]:
  """Seconds per batch and non-pad tokens per batch of the grain pipeline, after its first batch."""
  it = iter(pipeline.train_dataset(config, pipeline.load_source(config, "train")))
  next(it)
  start = time.perf_counter()
  tokens = sum(int(np.count_nonzero(next(it)["segment_ids"])) for _ in range(count))
  return (time.perf_counter() - start) / count, tokens / count


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _JSON.value:
    cli.check_output_file(_JSON.value, "--json")  # Before minutes of measurements, as device_check does.
  config = bench_config()
  model_config = config.model
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  dtype = model_config.compute_dtype  # The peak in the dtype our matmuls run in.
  tokens_per_step = _BATCH.value * _SEQ.value
  rows = []  # (part, quantity, value, unit)

  n = _MATMUL.value or (2048 if on_cpu else 8192)
  peak = bench_parts.matmul_peak(n, dtype)
  rows.append(("a", f"matmul peak ({n}^3 {jnp.dtype(dtype).name})", peak / 1e9, "GFLOP/s"))

  data = bench_parts.batches(config, bench_parts.WARMUP + _STEPS.value)
  initial_params, our_loss, xla_flops, our_step = bench_parts.ours_runner(config, model_config, data)
  runners = {"ours": our_step}
  threads = _TORCH_THREADS.value or os.cpu_count()
  device, torch_note = ("", "skipped (--skip_torch)") if _SKIP_TORCH.value else bench_parts.torch_device(backend)
  if device:
    torch_loss, runners["torch"] = bench_parts.torch_runner(config, model_config, initial_params, data, device,
                                                           threads)
  seconds = bench_parts.timed_rounds(runners, _STEPS.value, _ROUNDS.value)

  our_s = float(np.median(seconds["ours"]))
  our_tps = tokens_per_step / our_s
  flops_token = bench_parts.model_flops_per_token(model_config, _SEQ.value)
  rows += [("b", "ours: step time (median of rounds)", our_s * 1e3, "ms"),
           ("b", "ours: tokens/s (B x T)", our_tps, "tokens/s"),
           ("b", "ours: model FLOP/s (6N + attention)", flops_token * our_tps / 1e9, "GFLOP/s"),
           ("b", "ours: XLA-counted FLOP/s", xla_flops / our_s / 1e9, "GFLOP/s"),
           ("b", "ours: MFU vs (a)", 100.0 * flops_token * our_tps / peak, "%"),
           ("b", "ours: first-step loss", our_loss, "")]
  if "torch" in runners:
    torch_s = float(np.median(seconds["torch"]))
    per_round = [t / o for t, o in zip(seconds["torch"], seconds["ours"])]
    where = f"{threads} threads" if device == "cpu" else device
    rows += [("c", f"PyTorch ({where}, {jnp.dtype(model_config.compute_dtype).name}): step time (median of rounds)",
              torch_s * 1e3, "ms"),
             ("c", "PyTorch: tokens/s (B x T)", tokens_per_step / torch_s, "tokens/s"),
             ("c", "PyTorch: first-step loss (same weights, batch)", torch_loss, ""),
             ("c", f"ours / PyTorch tokens/s (median of {len(per_round)} rounds)", float(np.median(per_round)), "x"),
             ("c", "ours / PyTorch: lowest round", min(per_round), "x"),
             ("c", "ours / PyTorch: highest round", max(per_round), "x")]
  else:
    rows.append(("c", "PyTorch baseline", float("nan"), torch_note))

  data_s, data_tokens = bench_data(config, max(_STEPS.value, 4))
  rows += [("d", "pipeline: rows/s", _BATCH.value / data_s, "rows/s"),
           ("d", "pipeline: non-pad tokens/s", data_tokens / data_s, "tokens/s"),
           ("d", "step consumes: rows/s", _BATCH.value / our_s, "rows/s"),
           ("d", "pipeline / step (headroom)", our_s / data_s, "x")]

  c = model_config
  print(f"\nbench: {backend} x{jax.device_count()} ({os.cpu_count()} CPU cores), model hidden={c.hidden_size} "
        f"layers={c.num_layers} heads={c.num_heads}/{c.num_kv_heads}x{c.head_dim} mlp={c.mlp_dim} "
        f"vocab={c.vocab_size} {jnp.dtype(c.compute_dtype).name}, batch={_BATCH.value} x seq={_SEQ.value} "
        f"in {_ACCUM.value} micro-batch(es), {_ROUNDS.value} rounds x "
        f"{_STEPS.value} steps, "
        f"{np.mean([np.count_nonzero(b['segment_ids']) for b in data]) / tokens_per_step:.0%} non-pad")
  width = max(len(r[1]) for r in rows)
  for part, name, value, unit in rows:
    print(f"  ({part}) {name.ljust(width)}  {value:>12.4g} {unit}")
  if _JSON.value:
    files.write_atomic(_JSON.value, json.dumps([{"part": p, "quantity": q, "value": v, "unit": u}
                                                for p, q, v, u in rows], indent=2))


if __name__ == "__main__":
  cli.run(main)
