"""The default main job: a small LenVM on the synthetic generator, about 8 minutes on 2 CPU cores.

The final eval record holds value_mse next to bayes_value_mse (the exact value function) and const_value_mse (the
best constant): the trained model should close >= 90 % of the gap between them.
"""

from experiments.configs import base


def get_config():
  config = base.get_config("small")
  config.train.steps = 2000
  config.train.batch_size = 32
  config.train.eval_every = 500
  return config
