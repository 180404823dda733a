"""A LenVM initialised from SmolLM2-135M-Instruct on its own answers to one-digit arithmetic questions, 2 CPU cores.

The smollm2_gsm config (the same model and recipe) with the data of the job in experiments/smollm2_gsm/README.md
where the 135M generator gets problems right: reasoning-gym's basic_arithmetic with two one-digit terms, sampled at
temperature 0.5 (on GSM-style questions it answers none correctly, so accuracy under a budget cannot be measured).

  python -m experiments.generate --policy=$GGUF --tokenizer=$GGUF --prompts="$PROMPTS" --num_samples=6 \
      --max_new_tokens=160 --temperature=0.5 --batch_size=64 --shard_size=192 --eval_fraction=0.25 \
      --generator=smollm2-135m-instruct --output_dir=data/smollm2_arith/rollouts
  python -m experiments.train --config experiments/configs/smollm2_arith.py --workdir runs/smollm2_arith/pretrained_s0

with $PROMPTS = PROMPTS below and $GGUF = smollm2_gsm.smollm2_gguf().
"""

from experiments.configs import base, smollm2_gsm

PROMPTS = "reasoning_gym:basic_arithmetic:240:0:max_terms=2;max_digits=1;allow_parentheses=False;allow_negation=False"


def get_config(arg: str | None = None):
  """arg: data_dir=DIR reads DIR/train and DIR/eval (default data/smollm2_arith/rollouts)."""
  config = smollm2_gsm.get_config()
  base.set_data_dir(config, arg, "data/smollm2_arith/rollouts")
  config.data.max_len = 256  # Prompt (~40 tokens) + up to 160 generated; two completions share a row on average.
  config.data.max_prompt_len = 96
  config.train.batch_size = 8
  config.train.eval_batch_size = 16
  config.train.steps = 60  # Set from the data size before training: about two passes (README).
  config.train.log_every = 5
  config.optim.warmup_steps = 5
  config.checkpoint.every_steps = 20
  return config
