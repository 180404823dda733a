"""The pieces of the throughput benchmark that experiments/bench.py and experiments/device_check.py both run: the
benchmark's run config, the matmul peak, our compiled train step (lenvm_jax/train/program.py, as the trainer builds
it) and the same model, loss and optimizer in eager PyTorch, timed in interleaved rounds. No flags: a helper module,
not a tool (experiments/bench.py's docstring says what each part measures).
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import base
from lenvm_jax import config as config_lib, sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.model import flops
from lenvm_jax.train import program as program_lib, state as state_lib

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
  del model_config  # config.model: the program's.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  config_lib.check_batch_fits_mesh(config, mesh, jax.process_count())
  with jax.set_mesh(mesh):
    program, state = program_lib.build(config, mesh)
    initial_params = jax.device_get(state.params)
    micro = program.micro_batches(data[0])  # As the trainer feeds the step.
    train_sh, eval_sh = program.train_batch_shardings(micro), program.eval_batch_shardings(data[0])
    shape = lambda batch, sh: {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in batch.items()}
    compiled, _ = program.compile_steps(state_lib.shape_structs(state), train_sh, eval_sh, shape(micro, train_sh),
                                        shape(data[0], eval_sh))
    device_batches = [{k: jax.device_put(v, train_sh[k]) for k, v in program.micro_batches(b).items()} for b in data]

  def step(i: int):
    nonlocal state
    state, step_metrics = compiled(state, device_batches[i % len(device_batches)])
    jax.block_until_ready(state)
    return step_metrics

  first_loss = float(step(0)["loss"])
  with jax.set_mesh(mesh):
    xla_flops = xla_step_flops(program, state, data[0])
  return initial_params, first_loss, xla_flops, step


def xla_step_flops(program, state, batch) -> float:
  """XLA's FLOP count of the timed train step on `batch` (layers and micro-batches multiplied out; a compiled step's
  own count has each loop body once)."""
  one_micro = {k: jax.ShapeDtypeStruct((1,) + v.shape, v.dtype) for k, v in batch.items()}
  return program.train_step_flops(state_lib.shape_structs(state), one_micro)


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
