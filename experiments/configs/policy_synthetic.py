"""A tiny policy LM (LM loss only) on the synthetic generator: CPU seconds, for sampling rollouts in tests/demos.

It learns the generator's next-token distribution, including the stop probability of the hidden mode that the
prompt's mode token sets (hazards 0.05 / 0.3: ~20 vs ~3 tokens). Rollouts from it (experiments/generate.py, EOS id
1) are a real length-prediction task for a LenVM: how long a completion runs depends on the prompt.
"""

from experiments.configs import base


def get_config():
  config = base.get_config("tiny")
  config.loss.value_weight = 0.0
  config.loss.lm_weight = 1.0
  config.data.max_len = 48
  config.data.synthetic.hazards = (0.05, 0.3)
  config.data.synthetic.train_records = 8192
  config.data.synthetic.eval_records = 64
  config.train.steps = 150
  config.train.batch_size = 16
  config.train.eval_batch_size = 16
  config.train.eval_every = 0
  config.train.log_every = 50
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 10
  config.checkpoint.every_steps = 150
  config.checkpoint.async_save = False
  return config
