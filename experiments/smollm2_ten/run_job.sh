#!/usr/bin/env bash
# The smollm2_ten job end to end (experiments/smollm2_ten/README.md): rollouts, three pretrained-trunk seeds, the
# random trunk, the held-out length evaluation. Every stage resumes: generate skips finished shards, a trained run
# resumes from its last checkpoint, evaluate_lengths reruns (minutes). Run from the repository root:
#   bash experiments/smollm2_ten/run_job.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
DATA=${1:-data/smollm2_ten/rollouts}
RUNS=${2:-runs/smollm2_ten}
PY=${PYTHON:-python}
GGUF=$($PY -c "from experiments.configs.smollm2_gsm import smollm2_gguf; print(smollm2_gguf())")
PROMPTS=$($PY -c "from experiments.configs.smollm2_ten import PROMPTS; print(PROMPTS)")
CONFIG="experiments/configs/smollm2_ten.py:data_dir=$DATA"

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp generate
$PY -m experiments.generate --policy="$GGUF" --tokenizer="$GGUF" --prompts="$PROMPTS" --num_samples=8 \
    --max_new_tokens=128 --temperature=0.5 --batch_size=64 --shard_size=512 --eval_fraction=0.2 \
    --generator=smollm2-135m-instruct --output_dir="$DATA"

# Training skips the trainer's own eval (data.eval_path=''): evaluate_lengths below reads the eval split once per run.
train() {  # name, extra flags...
  local name=$1; shift
  stamp "train $name"  # A finished run restores its last step and stops at once.
  $PY -m experiments.train --config "$CONFIG" --workdir "$RUNS/$name" --config.data.eval_path= "$@"
}
# The pretrained seeds share one feature cache (same frozen weights and records); each random trunk has its own.
for seed in 0 1 2; do
  train pretrained_s$seed --config.seed=$seed --config.data.seed=$seed \
      --config.train.feature_cache_dir="$RUNS/feature_cache_pretrained"
done
train random_s0 --config.model.init_from=

stamp evaluate_lengths
$PY -m experiments.evaluate_lengths --workdir "$RUNS/pretrained_s0" --eval_path="$DATA/eval" \
    --compare="$RUNS/pretrained_s1,$RUNS/pretrained_s2,$RUNS/random_s0" --tokenizer="$GGUF"
stamp done
