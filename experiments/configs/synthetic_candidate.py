"""The main job (experiments/configs/synthetic.py) with a candidate-value head beside the value head (issue 22).

Same data, trunk, steps and optimiser; loss.candidate_weight = 1 trains Q(s_t, x) ~ V(s_t + x) from the hidden state
alone, so guided decoding can score candidates without running them (`--scorer=candidate_head`). `table` gives the
head its own per-token vectors; `--config.model.candidate_head=tied` uses the input embedding instead. Results:
experiments/candidate_head/README.md.
"""

from experiments.configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.model.candidate_head = "table"
  config.loss.candidate_weight = 1.0
  return config
