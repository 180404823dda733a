#!/usr/bin/env bash
# The smollm2_ten job end to end (experiments/smollm2_ten/README.md): rollouts, three pretrained-trunk seeds, the
# random trunk, the held-out length evaluation. Every stage resumes: generate skips finished shards, a trained run
# resumes from its last checkpoint, evaluate_lengths reads a report written for the same step (--reuse). Run from the repository root:
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

# Training skips the trainer's own eval (data.eval_path=''): evaluate_lengths reads the eval split once per run, as
# soon as the run is trained, and the closing --compare reads those reports back (--reuse).
EVAL=(--eval_path="$DATA/eval" --tokenizer="$GGUF")
run() {  # name, extra train flags...: train (a finished run restores its last step and stops), then evaluate
  local name=$1; shift
  stamp "train $name"
  $PY -m experiments.train --config "$CONFIG" --workdir "$RUNS/$name" --config.data.eval_path= "$@"
  stamp "evaluate_lengths $name"
  $PY -m experiments.evaluate_lengths --workdir "$RUNS/$name" "${EVAL[@]}" --reuse
}
# The pretrained seeds share one feature cache (same frozen weights and records); the random trunk has its own.
for seed in 0 1 2; do
  run pretrained_s$seed --config.seed=$seed --config.data.seed=$seed \
      --config.train.feature_cache_dir="$RUNS/feature_cache_pretrained"
done
run random_s0 --config.model.init_from=

stamp "compare"
$PY -m experiments.evaluate_lengths --workdir "$RUNS/pretrained_s0" "${EVAL[@]}" --reuse \
    --compare="$RUNS/pretrained_s1,$RUNS/pretrained_s2,$RUNS/random_s0"
stamp done
