"""optax AdamW with linear warmup + cosine decay and global-norm clipping; a frozen trunk trains only the head, and
train.trainable_layers = K only the top K decoder layers, the final norm and the heads.

Frozen parameters get zero updates and no optimizer state (no Adam moments): each parameter leaf is labelled
"train", "frozen", or, for the stacked decoder layers (one array per weight with a leading `layers` axis), "top":
AdamW on the top K entries of that axis only (its moments are [K, ...]). A per-layer tree (`layers` = {index:
layer}) is labelled layer by layer instead. Frozen gradients are zeroed before the global-norm clip, so the clip
sees the trainable parameters only.
"""

import jax
import jax.numpy as jnp
import optax

from lenvm_jax.config import OptimConfig, RunConfig
from lenvm_jax.model.transformer import LAYERS_AXIS


def learning_rate_schedule(optim_config: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(optim_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_config.lr * optim_config.end_lr_fraction)


# What a frozen trunk still trains: the value head and the candidate-value head (model/candidate_head.py).
HEADS = ("value_head", "candidate_head")


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales and biases are not decayed. The stacked decoder layers' leading
  `layers` axis does not count (a stack of norm scales is still no matrix)."""
  def per_layer_rank(path, p):
    stacked = bool(path) and getattr(path[0], "key", None) == LAYERS_AXIS
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(per_layer_rank, params)


# What trainable_layers = K trains besides the top K layers: the heads and the final norm under them.
TOP_OF_TRUNK = HEADS + ("final_norm",)
LAYERS = "layers"  # The decoder layers' key in the params: one stacked layer, or {index: layer}.


def _is_per_layer(layers) -> bool:
  """A per-layer tree ({0: layer, 1: layer, ...}), as opposed to one stacked layer with a leading `layers` axis."""
  return isinstance(layers, dict) and bool(layers) and all(str(k).isdigit() for k in layers)


def _layer_labels(layers, num_layers: int, trainable_layers: int):
  if _is_per_layer(layers):
    return {k: jax.tree.map(lambda _, k=k: "train" if int(k) >= num_layers - trainable_layers else "frozen", layer)
            for k, layer in layers.items()}
  return jax.tree.map(lambda _: "top", layers)


def _trainable_labels(params, freeze_trunk: bool, trainable_layers: int = 0, num_layers: int = 0):
  """A label per parameter leaf: "train", "frozen" or "top" (the top trainable_layers entries of a stacked leaf)."""
  def label(name, subtree):
    if freeze_trunk and name not in HEADS:
      return jax.tree.map(lambda _: "frozen", subtree)
    if trainable_layers and name == LAYERS and trainable_layers < num_layers:
      return _layer_labels(subtree, num_layers, trainable_layers)
    if trainable_layers and name not in TOP_OF_TRUNK and name != LAYERS:
      return jax.tree.map(lambda _: "frozen", subtree)  # Embeddings (and an untied LM head).
    return jax.tree.map(lambda _: "train", subtree)
  return {name: label(name, subtree) for name, subtree in params.items()}


def on_top_of_stack(inner: optax.GradientTransformation, keep: int) -> optax.GradientTransformation:
  """`inner` applied to the top `keep` entries of each leaf's leading axis; the entries below get zero updates and
  no state (init sees only the top slices)."""
  top = lambda tree: jax.tree.map(lambda x: x[-keep:], tree)

  def init(params):
    return inner.init(top(params))

  def update(updates, state, params=None):
    new, state = inner.update(top(updates), state, None if params is None else top(params))
    below = lambda u, n: jnp.concatenate([jnp.zeros_like(u[:-keep]), n.astype(u.dtype)])
    return jax.tree.map(below, updates, new), state

  return optax.GradientTransformation(init, update)


def _zero_frozen(labels, keep: int) -> optax.GradientTransformation:
  """Stateless: frozen gradients (and the frozen bottom of stacked ones) set to zero."""
  keep_top = optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u: jnp.concatenate([jnp.zeros_like(u[:-keep]), u[-keep:]]), updates))
  return optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero(), "top": keep_top}, labels)


def _clip_top(max_norm: float, labels, keep: int) -> optax.GradientTransformation:
  """optax.clip_by_global_norm for updates whose frozen parts are zero already (after _zero_frozen): the norm and the
  scaling read only the "train" leaves and the top `keep` slices of "top" ones, so a step makes no pass over the
  frozen weights' updates (with a cached trunk that pass cost more than the trained layers). The same result and
  the same (empty) state as clip_by_global_norm."""
  def update(updates, state, params=None):
    del params
    parts = jax.tree.leaves(jax.tree.map(lambda u, label: {"top": u[-keep:], "train": u}.get(label, ()),
                                         updates, labels))
    g_norm = optax.tree.norm(parts)
    trigger = jnp.squeeze(g_norm < max_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)

    def one(u, label):
      if label == "top":
        return jnp.concatenate([jnp.zeros_like(u[:-keep]), clip(u[-keep:])])
      return clip(u) if label == "train" else u  # "frozen": zero already.
    return jax.tree.map(one, updates, labels), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(run: RunConfig, params_shape) -> optax.GradientTransformation:
  optim = run.optim
  clip = optax.clip_by_global_norm(optim.clip_norm)
  adamw = optax.adamw(learning_rate_schedule(optim, run.train.steps), b1=optim.b1, b2=optim.b2,
                      eps=optim.eps, weight_decay=optim.weight_decay, mask=_decay_mask)
  keep = run.train.trainable_layers
  if keep and keep < run.model.num_layers and not run.train.freeze_trunk:
    labels = _trainable_labels(params_shape, False, keep, run.model.num_layers)
    return optax.chain(_zero_frozen(labels, keep), _clip_top(optim.clip_norm, labels, keep), optax.multi_transform(
        {"train": adamw, "frozen": optax.set_to_zero(), "top": on_top_of_stack(adamw, keep)}, labels))
  adamw = optax.chain(clip, adamw)
  if not run.train.freeze_trunk:
    return adamw
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               _trainable_labels(params_shape, freeze_trunk=True))
