"""Qwen2.5-1.5B shapes on a 2x2x2 (data, fsdp, tensor) mesh: for ahead-of-time compilation, not for CPU training.

  python -m experiments.compile_check --config experiments/configs/qwen25_1p5b_aot.py

lowers and compiles the real train and eval steps on 8 fake CPU devices and prints per-device memory and FLOPs.
On a TPU or GPU slice the same config trains (point data.* at real trajectories).
"""

from experiments.configs import base


def get_config():
  config = base.get_config("qwen2.5-1.5b")
  config.model.vocab_size = 151936
  config.loss.gamma = 0.997  # The paper's value for Qwen2.5 generators.
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.data.max_len = 2048
  config.train.batch_size = 16
  config.train.accum_steps = 2
  config.train.eval_batch_size = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.optim.lr = 1e-5
  return config
