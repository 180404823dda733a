"""Every config field, with its default. Other configs start from `get_config()` and change what they need."""

import ml_collections
from ml_collections import config_dict

from lenvm_jax.model.config import preset_fields


def get_config(preset: str = "small") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameter init and RNG state.

  config.model = ml_collections.ConfigDict(preset_fields(preset))
  config.model.vocab_size = 64
  # A float in (0, 1), "auto": 0.01 ** (1 / L_p99) of the training split, or "auto_mre": the gamma with the least
  # prompt-boundary MRE for a generator-only predictor on the training split (the resolved value is saved).
  config.model.gamma = config_dict.FieldReference(0.98, field_type=object)
  # A Hugging Face causal-LM dir (Llama / Qwen2 / Qwen3) whose weights start a fresh run (+ its value head if it
  # has value_head.safetensors). Its config.json must match the model fields above; a resumed run ignores it.
  config.model.init_from = ""

  config.loss = ml_collections.ConfigDict()
  config.loss.target_type = "discounted"  # discounted | raw_length | normalized_length | log_length (ablations)
  config.loss.gae_lambda = 1.0  # 1 = Monte-Carlo return (the paper); < 1 bootstraps from stop-gradient values.
  config.loss.lm_weight = 0.0  # Weight of a joint next-token cross-entropy on completion tokens.
  config.loss.lm_stride = 1  # Take the LM term on every k-th position only (a 32k-vocab head outweighs a small trunk).
  config.loss.value_weight = 1.0  # Weight of the value MSE; 0 with lm_weight > 0 trains a plain LM (a policy).
  config.loss.boundary_weight = 1.0  # Each prompt-boundary state s_0 counts as this many tokens in the value MSE.
  config.loss.length_normalizer = 1024.0  # Only for target_type='normalized_length': length that maps to 1.

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # synthetic | jsonl | arrayrecord | tfds
  config.data.train_path = ""  # jsonl: a file; arrayrecord: a shard file, a glob, or <prepare_data dir>/train.
  config.data.eval_path = ""  # Held-out split, same forms; empty = no eval.
  config.data.tfds_name = "lenvm_trajectories"  # data.source='tfds': a prepared TFDS dataset's name ...
  config.data.tfds_data_dir = ""  # ... and its data_dir (see lenvm_jax/data/tfds_builder.py).
  config.data.max_len = 128  # Row length; longer sequences are cut, keeping their true remaining lengths.
  config.data.max_prompt_len = 0  # > 0: keep only each prompt's last tokens; 0: a prompt >= max_len is an error.
  config.data.packing = "first_fit"  # first_fit | best_fit | none: several trajectories per row, kept apart.
  config.data.packing_bins = 0  # Rows open for packing at once; 0 = the rows of one batch.
  config.data.unfinished = "drop"  # Completions without EOS: drop | infinite (target -1) | as_finished.
  config.data.seed = 0  # Shuffle order (and synthetic sampling).
  config.data.read_threads = 1
  config.data.worker_count = 0  # Processes that prepare batches ahead (grain mp_prefetch); 0 = in-process threads.
  config.data.prefetch = 4  # Batches prepared ahead by grain threads.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.hazards = (0.01, 0.03, 0.08, 0.25)  # Stop probability per token in each hidden mode.
  config.data.synthetic.switch_prob = 0.04  # Probability a completion token switches the mode.
  config.data.synthetic.train_records = 200_000
  config.data.synthetic.eval_records = 1024

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000
  config.train.batch_size = 32  # Global batch, in rows.
  config.train.accum_steps = 1  # Micro-batches per step (gradient accumulation); must divide batch_size.
  config.train.eval_batch_size = 64
  config.train.eval_every = 500  # 0 = evaluate only at the end.
  config.train.log_every = 50
  config.train.freeze_trunk = False  # Train only the value head.
  # > 0: keep an exponential moving average of the weights (decay per step, ramped up over the first steps); eval,
  # prediction, export and rollouts then use it. It averages out the step-to-step noise of the final weights.
  config.train.ema_decay = 0.0
  config.train.nonfinite = "skip"  # A non-finite loss/gradient: skip the update and count it, or stop.

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.optim.end_lr_fraction = 0.1
  config.optim.weight_decay = 0.01
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.clip_norm = 1.0

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1 takes the devices that the other axes leave.
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  return config
