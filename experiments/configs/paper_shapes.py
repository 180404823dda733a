"""The paper's LenVM shapes on TPU slices, for experiments.compile_check --topology (and, with data.* pointed at real
trajectories, for training there). Pick one with `--config=experiments/configs/paper_shapes.py:<name>`:

  qwen2.5-1.5b  v5e:2x4    mesh (1, 8, 1)   T 8192 x B 8
  qwen2.5-7b    v5p:2x2x4  mesh (1, 16, 1)  T 4096 x B 32 (2 micro-batches)
  qwen3-8b      v5p:2x2x4  mesh (1, 16, 1)  T 4096 x B 32 (2 micro-batches)
  qwen3-32b     v5p:4x4x4  mesh (1, 64, 1)  T 4096 x B 64

All: bfloat16 compute, remat full over the scanned layers, splash attention, FSDP over every chip. The printed
memory and compile times are in docs/scaling.md.
"""

from experiments.configs import base

# name -> (preset, (data, fsdp, tensor), max_len, batch_size, accum_steps, the slice it is sized for)
SHAPES = {
    "qwen2.5-1.5b": ("qwen2.5-1.5b", (1, 8, 1), 8192, 8, 1, "v5e:2x4"),
    "qwen2.5-7b": ("qwen2.5-7b", (1, 16, 1), 4096, 32, 2, "v5p:2x2x4"),
    "qwen3-8b": ("qwen3-8b", (1, 16, 1), 4096, 32, 2, "v5p:2x2x4"),
    "qwen3-32b": ("qwen3-32b", (1, 64, 1), 4096, 64, 1, "v5p:4x4x4"),
}
VOCAB_SIZES = {"qwen2.5-1.5b": 151936, "qwen2.5-7b": 152064, "qwen3-8b": 151936, "qwen3-32b": 151936}


def get_config(name: str = "qwen2.5-1.5b"):
  if name not in SHAPES:
    raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
  preset, mesh, max_len, batch_size, accum_steps, _ = SHAPES[name]
  config = base.get_config(preset)
  config.model.vocab_size = VOCAB_SIZES[name]  # base.get_config sets a 64-token vocabulary.
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.loss.gamma = 0.997  # The paper's value for Qwen2.5 generators.
  config.data.max_len = max_len
  config.train.batch_size = batch_size
  config.train.accum_steps = accum_steps
  config.train.eval_batch_size = batch_size // accum_steps
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  config.optim.lr = 1e-5
  return config
