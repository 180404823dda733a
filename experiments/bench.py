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
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.configs import base
from experiments import cli
from lenvm_jax import config as config_lib, files, sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.model import flops, transformer
from lenvm_jax.train import optimizer, state as state_lib, step as step_lib
from lenvm_jax.value.objective import Objective

_PRESET = flags.DEFINE_string("preset", "small", "Model preset (lenvm_jax/model_config.py PRESETS).")
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
WARMUP = 2


def make_bench_config(preset: str, shape: dict, seq_len: int, batch: int, accum_steps: int,
                      dtype: str) -> RunConfig:
  """The run config benchmarked: synthetic data whose completions mostly fill the row (little padding). `shape`
  overrides the preset's model fields (a value of 0 keeps the preset's)."""
  config = base.get_config(preset)
  for field, value in shape.items():
    if value:
      config.model[field] = value
  config.model.dtype = dtype
  config.data.max_len = seq_len
  config.data.packing = "none"  # One trajectory per row: the PyTorch baseline needs no segment-aware attention.
  config.data.synthetic.hazards = (1.0 / seq_len,)  # Mean completion = one row: rows are mostly full.
  config.data.synthetic.train_records = 4096
  config.data.unfinished = "infinite"  # Keep long (cut) completions: target -1 (docs/method.md §4).
  config.train.batch_size = batch
  config.train.accum_steps = accum_steps
  config.optim.warmup_steps = 0
  config.mesh.data = 1  # One device, like the PyTorch baseline and the matmul peak (a); MFU is per chip.
  return RunConfig.from_dict(config)


def bench_config():
  """make_bench_config from the flags."""
  shape = {"hidden_size": _HIDDEN.value, "num_layers": _LAYERS.value, "head_dim": _HEAD_DIM.value,
           "mlp_dim": _MLP.value}
  return make_bench_config(_PRESET.value, shape, _SEQ.value, _BATCH.value, _ACCUM.value, _DTYPE.value)


def matmul_peak(n: int, dtype) -> float:
  """Best FLOP/s of an n x n x n matmul (best of 5 after a compile run)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


model_flops_per_token = flops.train_flops_per_token  # Analytic: 6N + attention.


def batches(config, count: int) -> list[dict]:
  it = iter(pipeline.train_dataset(config, pipeline.load_source(config, "train")))
  return [next(it) for _ in range(count)]


def ours_runner(config, model_config, data: list[dict]):
  """Initial params, first-step loss, XLA's FLOP count and a step(batch_index) of the trainer's compiled step."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  config_lib.check_batch_fits_mesh(config, mesh, jax.process_count())
  objective = Objective.from_config(config.loss)
  with jax.set_mesh(mesh):
    graphdef, abstract = transformer.abstract_model(model_config)
    tx = optimizer.make_optimizer(config, abstract.to_pure_dict())
    state, state_sh = state_lib.create_train_state(model_config, tx, mesh, config.seed)
    initial_params = jax.device_get(state.params)
    accum = config.train.accum_steps  # [B, T] -> [accum_steps, B / accum_steps, T], as the trainer feeds the step.
    to_micro = lambda b: {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in b.items()}
    train_sh = sharding.batch_shardings(mesh, to_micro(data[0]), leading=1)
    eval_sh = sharding.batch_shardings(mesh, data[0], leading=0)
    shape = lambda batch, sh: {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in batch.items()}
    compiled, _ = step_lib.compile_steps(graphdef, objective, tx, config.train, state_sh, train_sh, eval_sh,
                                         state_lib.shape_structs(state), shape(to_micro(data[0]), train_sh),
                                         shape(data[0], eval_sh))
    device_batches = [{k: jax.device_put(v, train_sh[k]) for k, v in to_micro(b).items()} for b in data]

  def step(i: int):
    nonlocal state
    state, step_metrics = compiled(state, device_batches[i % len(device_batches)])
    jax.block_until_ready(state)
    return step_metrics

  first_loss = float(step(0)["loss"])
  with jax.set_mesh(mesh):
    xla_flops = xla_step_flops(model_config, objective, tx, config, state, data[0])
  return initial_params, first_loss, xla_flops, step


def xla_step_flops(model_config, objective, tx, config, state, batch) -> float:
  """XLA's FLOP count of the timed train step on `batch` (step.train_step_flops: layers and micro-batches multiplied
  out; a compiled step's own count has each loop body once)."""
  one_micro = {k: jax.ShapeDtypeStruct((1,) + v.shape, v.dtype) for k, v in batch.items()}
  return step_lib.train_step_flops(model_config, objective, tx, config.train, state_lib.shape_structs(state),
                                   one_micro)


def torch_device(backend: str) -> tuple[str, str]:
  """The torch device matching JAX's backend, or "" and why the baseline cannot run there."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (test-only dependency)
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return "", f"{e.name} not installed: pip install -r requirements-parity.txt"
  if backend == "cpu":
    return "cpu", ""
  if backend in ("gpu", "cuda") and torch.cuda.is_available():
    return "cuda", ""
  if backend in ("gpu", "cuda"):
    return "", "skipped (torch has no CUDA: install a CUDA build of torch for a GPU baseline)"
  return "", f"skipped (no PyTorch baseline on {backend})"


def torch_runner(config, model_config, initial_params, data: list[dict], device: str, threads: int):
  """First-step loss and a step(batch_index) of the same model, loss and optimizer in eager PyTorch + transformers,
  from our initial weights, on `device` in our compute dtype."""
  import torch  # pylint: disable=g-import-not-at-top  (test-only dependency)
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  from lenvm_jax.model import hf_export, hf_layout  # pylint: disable=g-import-not-at-top

  if device == "cpu":
    torch.set_num_threads(threads)
  bf16 = model_config.compute_dtype == jnp.bfloat16
  with tempfile.TemporaryDirectory() as directory:
    hf_export.export(initial_params, model_config, directory)
    transformers.logging.set_verbosity_error()  # The load report lists the unused lm_head: expected here.
    trunk = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32)
    head = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(directory, hf_layout.VALUE_HEAD_FILE)).items()}

  class ValueModel(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.trunk = trunk
      h = model_config.hidden_size
      self.fc, self.summary = torch.nn.Linear(h, h), torch.nn.Linear(h, 1)
      with torch.no_grad():
        self.fc.weight.copy_(head["v_head.fc.weight"]), self.fc.bias.copy_(head["v_head.fc.bias"])
        self.summary.weight.copy_(head["v_head.summary.weight"]), self.summary.bias.copy_(head["v_head.summary.bias"])

    def forward(self, tokens, positions, attention_mask):
      with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):  # Our mixed precision: bf16 matmuls.
        hidden = self.trunk(input_ids=tokens, position_ids=positions, attention_mask=attention_mask).last_hidden_state
      hidden = hidden.float()  # Value head and loss in float32 (docs/method.md §3).
      return self.summary(torch.nn.functional.silu(self.fc(hidden)))[..., 0]

  model = ValueModel().to(device).train()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
  o = config.optim
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  log_gamma = float(np.log(config.loss.gamma))
  tensors = [{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in b.items()} for b in data]

  micro = len(data[0]["tokens"]) // config.train.accum_steps

  def step(i: int):
    b = tensors[i % len(tensors)]
    count = b["value_mask"].float().sum().clamp(min=1.0)  # Token mean over the whole batch, as ours.
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for start in range(0, len(b["tokens"]), micro):  # Gradient accumulation over micro-batches.
      m = {k: v[start:start + micro] for k, v in b.items()}
      z = model(m["tokens"].long(), m["positions"].long(), (m["segment_ids"] > 0).long())
      target = torch.where(m["remaining"] < 0, -1.0, torch.expm1(m["remaining"].float() * log_gamma))
      mask = m["value_mask"].float()
      micro_loss = (mask * (-torch.sigmoid(z) - target) ** 2).sum() / count
      micro_loss.backward()
      loss += micro_loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
    opt.step()
    return float(loss)  # Waits for the device, like our step's block_until_ready.

  return step(0), step


def timed_rounds(runners: dict, steps: int, rounds: int) -> dict:
  """Seconds per step of each runner in each round. Rounds interleave the runners, so a slow phase of a shared
  machine lands on all of them rather than on whichever ran during it."""
  for run in runners.values():
    for i in range(1, WARMUP):
      run(i)
  seconds = {name: [] for name in runners}
  for r in range(rounds):
    for name, run in runners.items():
      start = time.perf_counter()
      for i in range(steps):
        run(WARMUP + r * steps + i)
      seconds[name].append((time.perf_counter() - start) / steps)
  return seconds


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
  peak = matmul_peak(n, dtype)
  rows.append(("a", f"matmul peak ({n}^3 {jnp.dtype(dtype).name})", peak / 1e9, "GFLOP/s"))

  data = batches(config, WARMUP + _STEPS.value)
  initial_params, our_loss, xla_flops, our_step = ours_runner(config, model_config, data)
  runners = {"ours": our_step}
  threads = _TORCH_THREADS.value or os.cpu_count()
  device, torch_note = ("", "skipped (--skip_torch)") if _SKIP_TORCH.value else torch_device(backend)
  if device:
    torch_loss, runners["torch"] = torch_runner(config, model_config, initial_params, data, device, threads)
  seconds = timed_rounds(runners, _STEPS.value, _ROUNDS.value)

  our_s = float(np.median(seconds["ours"]))
  our_tps = tokens_per_step / our_s
  flops_token = model_flops_per_token(model_config, _SEQ.value)
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
