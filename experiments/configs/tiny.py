"""Seconds-scale config for tests: tiny model, short synthetic rows, a checkpoint every few steps."""

from experiments.configs import base


def get_config():
  config = base.get_config("tiny")
  config.data.max_len = 48
  config.data.synthetic.hazards = (0.05, 0.3)
  config.data.synthetic.train_records = 4096
  config.data.synthetic.eval_records = 64
  config.train.steps = 20
  config.train.batch_size = 8
  config.train.eval_batch_size = 16
  config.train.eval_every = 10
  config.train.log_every = 1
  config.optim.warmup_steps = 5
  config.checkpoint.every_steps = 5
  config.checkpoint.async_save = False
  return config
