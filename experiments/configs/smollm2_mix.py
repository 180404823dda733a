"""A LenVM initialised from SmolLM2-135M-Instruct on its own answers to a mix of four short tasks, 2 CPU cores.

The smollm2_arith config (same model, recipe and sampling) on a mix of reasoning-gym tasks whose typical answer length
differs by task: two-term one-digit `chain_sum` and `spell_backward` (SmolLM2 answers in ~13 - 14 tokens),
`letter_counting` (~26) and two-term one-digit `basic_arithmetic` (~70; median lengths of a 16-sample probe at
temperature 0.5). Here the prompt tells something about the length, so prompt-boundary MRE can show whether the LenVM
reads it (experiments/smollm2_gsm/README.md, section 1b).

  python -m experiments.generate --policy=$GGUF --tokenizer=$GGUF --prompts="$PROMPTS" --num_samples=6 \
      --max_new_tokens=160 --temperature=0.5 --batch_size=64 --shard_size=192 --eval_fraction=0.25 \
      --generator=smollm2-135m-instruct --output_dir=data/smollm2_mix/rollouts
  python -m experiments.train --config experiments/configs/smollm2_mix.py --workdir runs/smollm2_mix/pretrained_s0

with $PROMPTS = PROMPTS below and $GGUF = smollm2_gsm.smollm2_gguf().
"""

from experiments.configs import base, smollm2_arith

PROMPTS = ("reasoning_gym:chain_sum:40:0:min_terms=2;max_terms=2;max_digits=1"
           "+spell_backward:40:0"
           "+letter_counting:40:0"
           "+basic_arithmetic:40:0:max_terms=2;max_digits=1;allow_parentheses=False;allow_negation=False")


def get_config(arg: str | None = None):
  """arg: data_dir=DIR reads DIR/train and DIR/eval (default data/smollm2_mix/rollouts)."""
  config = smollm2_arith.get_config()
  base.set_data_dir(config, arg, "data/smollm2_mix/rollouts")
  return config
