"""The default main job: a small LenVM on the synthetic generator, about 6 minutes on 2 CPU cores.

The final eval record holds value_mse next to bayes_value_mse (the exact value function) and const_value_mse (the
best constant): the trained model should close >= 90 % of the gap between them.
"""

from experiments.configs import base


def get_config():
  config = base.get_config("small")
  config.train.steps = 1500
  config.train.batch_size = 32
  config.train.eval_every = 500
  config.optim.lr = 2e-3
  return config
