"""The base run of the paper's ablations (experiments/reproduce.py): a tiny LenVM on a synthetic world with 16
completions per prompt, small enough that one run takes about a minute on 2 CPU cores.

Every prompt has 16 sampled completions in both splits, so the held-out prompt-boundary L_GT (docs/method.md §8) is the
mean return of 16 samples, as the paper's 16-sample rollouts; 64 held-out prompts. Rows of 64 tokens: longer
completions are cut and keep their true remaining lengths. reproduce.py sweeps one field of this config per figure
(and points data.* at real rollouts with --data).
"""

from experiments.configs import base


def get_config():
  config = base.get_config("tiny")
  config.loss.gamma = 0.98
  config.data.max_len = 64
  config.data.synthetic.samples_per_prompt = 16
  config.data.synthetic.eval_records = 64 * 16
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.eval_batch_size = 64
  config.train.eval_every = 100
  config.train.log_every = 50
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 30
  config.checkpoint.every_steps = 300
  return config
