"""optax AdamW with linear warmup + cosine decay and global-norm clipping; a frozen trunk trains only the head."""

import jax
import optax

from lenvm_jax.config import OptimConfig, RunConfig


def learning_rate_schedule(optim_config: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(optim_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_config.lr * optim_config.end_lr_fraction)


# What a frozen trunk still trains: the value head and the candidate-value head (model/candidate_head.py).
HEADS = ("value_head", "candidate_head")


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales and biases are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _trainable_labels(params, freeze_trunk: bool):
  labels = {k: jax.tree.map(lambda _: "frozen" if freeze_trunk and k not in HEADS else "train", v)
            for k, v in params.items()}
  return labels


def make_optimizer(run: RunConfig, params_shape) -> optax.GradientTransformation:
  optim = run.optim
  adamw = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(learning_rate_schedule(optim, run.train.steps), b1=optim.b1, b2=optim.b2,
                  eps=optim.eps, weight_decay=optim.weight_decay, mask=_decay_mask),
  )
  if not run.train.freeze_trunk:
    return adamw
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               _trainable_labels(params_shape, freeze_trunk=True))
