"""A SmolLM2-135M LenVM on ten times the smollm2_mix data: 1,048 reasoning-gym problems x 8 samples over seven tasks.

The smollm2_mix recipe (SmolLM2-135M-Instruct generates at temperature 0.5 and is the trunk; its top 2 of 30 layers,
the final norm and the value head train) with what issue 32 added for data at this scale: the frozen 28 layers'
output is computed once per record into an on-disk cache (train.feature_cache=auto), answers cut at the 128-token
limit train as censored targets with the bootstrapped bound (data.unfinished=censored, loss.censored_bootstrap)
instead of being dropped, and the run is sized in passes over the data (train.epochs). The job, its commands and
what they printed: experiments/smollm2_ten/README.md.

  python -m experiments.generate --policy=$GGUF --tokenizer=$GGUF --prompts="$PROMPTS" --num_samples=8 \
      --max_new_tokens=128 --temperature=0.5 --batch_size=64 --shard_size=512 --eval_fraction=0.2 \
      --generator=smollm2-135m-instruct --output_dir=data/smollm2_ten/rollouts
  python -m experiments.train --config experiments/configs/smollm2_ten.py --workdir runs/smollm2_ten/pretrained_s0

with $PROMPTS = PROMPTS below and $GGUF = smollm2_gsm.smollm2_gguf().
"""

from experiments.configs import base, smollm2_mix

# Seven tasks whose answers differ in length by task and by problem (a probe of 8 problems x 2 samples per task chose
# them, looking at lengths only; README). 160 draws each; small tasks repeat questions, kept once: 1,048 distinct.
PROMPTS = ("reasoning_gym:chain_sum:160:0:min_terms=2;max_terms=2;max_digits=1"
           "+spell_backward:160:0"
           "+letter_counting:160:0"
           "+basic_arithmetic:160:0:max_terms=2;max_digits=1;allow_parentheses=False;allow_negation=False"
           "+products:160:0"
           "+calendar_arithmetic:160:0"
           "+decimal_arithmetic:160:0")


def get_config(arg: str | None = None):
  """arg: data_dir=DIR reads DIR/train and DIR/eval (default data/smollm2_ten/rollouts)."""
  config = smollm2_mix.get_config()
  base.set_data_dir(config, arg, "data/smollm2_ten/rollouts")
  config.data.max_prompt_len = 128  # The longest prompt is 99 tokens: none is cut.
  config.data.max_len = 256  # Prompt + up to 128 generated.
  config.data.unfinished = "censored"
  config.loss.censored_bootstrap = True
  config.train.feature_cache = "auto"
  config.train.steps = 0
  config.train.epochs = 1.0
  config.train.batch_size = 16
  config.train.eval_batch_size = 32
  config.train.log_every = 20
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 10
  config.checkpoint.every_steps = 100
  return config
