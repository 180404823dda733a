"""The pure training and evaluation steps. Jitted once by the trainer with explicit shardings.

A train batch is a dict of [accum_steps, micro_batch, max_len] arrays (see lenvm_jax/data/rows.py). Each micro-batch
loss is divided by the valid-token count of the *whole* batch, so the summed gradient is exactly the token-mean
gradient of the global batch however it is split.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lenvm_jax.config import TrainConfig
from lenvm_jax.data import pipeline
from lenvm_jax.model import transformer
from lenvm_jax.value import candidate, metrics
from lenvm_jax.value.objective import LMHead, Objective
from lenvm_jax.train.state import TrainState


def forward_heads(graphdef, params, batch, *, freeze_trunk: bool, objective: Objective, dropout_key=None,
                  frozen_layers: int = 0):
  """The value logits z [B, T] (float32); when the LM term is on, its hidden states and head (objective.LMHead: the
  loss computes the logits chunk by chunk), else None; when the candidate loss is on, the candidate head's logit of
  each position's realised next token [B, T] (one gathered column per position; value/candidate.py), else None.
  frozen_layers: the bottom layers (and embeddings) get no backward pass (train.trainable_layers); a batch with
  cached features (data/pipeline.FEATURES: their output, or under freeze_trunk the whole stack's) runs only the
  layers above them."""
  model = nnx.merge(graphdef, params)
  if pipeline.FEATURES in batch:  # The frozen layers' cached output (train/feature_cache.py): run the layers above.
    hidden = model.hidden_states_from(batch[pipeline.FEATURES], batch["positions"], batch["segment_ids"],
                                      frozen_layers or model.config.num_layers, dropout_key)
  else:
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key,
                                 frozen_layers=frozen_layers)
  if freeze_trunk:
    hidden = jax.lax.stop_gradient(hidden)
  with_lm = objective.lm_weight > 0
  candidate_z = None
  if objective.candidate_weight > 0:
    candidate_z = model.candidate_logits(hidden, candidate.next_tokens(batch)[..., None])[..., 0]
  lm_head = LMHead(objective.lm_positions(hidden, 1), model.lm_head_weight()) if with_lm else None
  return model.value_logits(hidden), lm_head, candidate_z


def _metric_sums(z, candidate_z, batch, objective: Objective):
  sums = metrics.metric_sums(z, batch, objective.kind)
  if candidate_z is not None:
    sums.update(candidate.metric_sums(objective.kind, candidate_z, z, batch))
  return sums


def ema_update(ema_params, params, step, decay: float):
  """One step of the parameter EMA. The decay ramps up as min(decay, (1 + t) / (10 + t)) (t = updates so far), so the
  average forgets the random initialisation within the first steps instead of after ~1 / (1 - decay)."""
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def _is_stacked(path) -> bool:
  return bool(path) and getattr(path[0], "key", None) == "layers"


def _below_cut(grads, frozen_layers: int):
  """The gradient without the stacked layers' bottom frozen_layers slices (zero there): what its norm needs."""
  if not frozen_layers:
    return grads
  return jax.tree_util.tree_map_with_path(lambda path, g: g[frozen_layers:] if _is_stacked(path) else g, grads)


def _apply_updates(params, updates, finite, frozen_layers: int):
  """params + updates where the step is finite (else params). With frozen_layers, the stacked layers' updates are
  zero below the cut, so only their top slices are written: a step does not rewrite the frozen weights."""
  def one(path, p, u):
    if frozen_layers and _is_stacked(path):
      top = p[frozen_layers:]
      return p.at[frozen_layers:].set(jnp.where(finite, (top + u[frozen_layers:]).astype(p.dtype), top))
    return jnp.where(finite, (p + u).astype(p.dtype), p)
  return jax.tree_util.tree_map_with_path(one, params, updates)


def train_step(state: TrainState, batch, *, graphdef, objective: Objective, tx: optax.GradientTransformation,
               freeze_trunk: bool, ema_decay: float = 0.0, frozen_layers: int = 0):
  value_count, lm_count = objective.token_counts(batch)
  candidate_count = candidate.count(batch) if objective.candidate_weight > 0 else None
  next_rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

  def micro_loss(params, micro, dropout_key):
    z, lm_head, candidate_z = forward_heads(graphdef, params, micro, freeze_trunk=freeze_trunk,
                                              objective=objective, dropout_key=dropout_key,
                                              frozen_layers=frozen_layers)
    sums = objective.sums(z, lm_head, micro, candidate_z)
    return (objective.loss(sums, value_count, lm_count, candidate_count),
            (sums, _metric_sums(z, candidate_z, micro, objective)))

  def accumulate(grads, micro_and_index):
    micro, index = micro_and_index
    (loss, aux), micro_grads = jax.value_and_grad(micro_loss, has_aux=True)(
        state.params, micro, jax.random.fold_in(dropout_rng, index))
    return jax.tree.map(jnp.add, grads, micro_grads), (loss, aux)

  micro_index = jnp.arange(batch["tokens"].shape[0])  # Each micro-batch draws its own dropout masks.
  if batch["tokens"].shape[0] == 1:  # One micro-batch: no zero-filled carry of every parameter's gradient (a pass
    # over all of them that a step on cached features would mostly spend on frozen zeros).
    (losses, (sums, metric_sums)), grads = jax.value_and_grad(micro_loss, has_aux=True)(
        state.params, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(dropout_rng, micro_index[0]))
    losses, sums, metric_sums = jax.tree.map(lambda x: x[None], (losses, sums, metric_sums))
  else:
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (losses, (sums, metric_sums)) = jax.lax.scan(accumulate, zeros, (batch, micro_index))
  loss = jnp.sum(losses)
  grad_norm = optax.global_norm(_below_cut(grads, frozen_layers))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # Non-finite guard: the update is dropped (state kept) and counted; the trainer reports it or stops.
  params = _apply_updates(state.params, updates, finite, frozen_layers)
  ema_params = None if state.ema_params is None else ema_update(state.ema_params, params, state.step, ema_decay)
  keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=keep_new(opt_state, state.opt_state),
      rng=jax.random.key_data(next_rng),
      nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32),
      ema_params=None if ema_params is None else keep_new(ema_params, state.ema_params),
  )
  step_metrics = jax.tree.map(jnp.sum, metric_sums)
  step_metrics.update(loss=loss, grad_norm=grad_norm, finite=finite)
  return new_state, step_metrics


def eval_step(params, batch, *, graphdef, objective: Objective):
  """Sums over one [B, T] eval batch: the metrics, and the objective's pieces with their token counts."""
  z, lm_head, candidate_z = forward_heads(graphdef, params, batch, freeze_trunk=False, objective=objective)
  sums = _metric_sums(z, candidate_z, batch, objective)
  value_count, lm_count = objective.token_counts(batch)
  sums.update({"objective/" + k: v for k, v in objective.sums(z, lm_head, batch, candidate_z).items()},
              **{"objective/value_count": value_count, "objective/lm_count": lm_count})
  if candidate_z is not None:
    sums["objective/candidate_count"] = candidate.count(batch)
  return sums


def frozen_layers(train_config: TrainConfig, params) -> int:
  """How many bottom decoder layers train.trainable_layers leaves out of the backward pass (0: none)."""
  if not train_config.trainable_layers:
    return 0
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]  # The stacked layers' leading axis.
  return max(num_layers - train_config.trainable_layers, 0)


def jit_steps(graphdef, objective, tx, train_config: TrainConfig, state_shardings, train_batch_shardings,
              eval_batch_shardings, state_shape):
  """(train, evaluate): both steps jitted with explicit shardings (the train state donated), not yet lowered."""
  train = jax.jit(
      functools.partial(train_step, graphdef=graphdef, objective=objective, tx=tx,
                        freeze_trunk=train_config.freeze_trunk, ema_decay=train_config.ema_decay,
                        frozen_layers=frozen_layers(train_config, state_shape.params)),
      in_shardings=(state_shardings, train_batch_shardings), out_shardings=(state_shardings, None),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, objective=objective),
                     in_shardings=(state_shardings.params, eval_batch_shardings))
  return train, evaluate


def compile_steps(graphdef, objective, tx, train_config: TrainConfig, state_shardings, train_batch_shardings,
                  eval_batch_shardings, state_shape, train_batch_shape, eval_batch_shape):
  """AOT-compiles both steps for the given shapes and shardings; the trainer and compile_check share this."""
  train, evaluate = jit_steps(graphdef, objective, tx, train_config, state_shardings, train_batch_shardings,
                              eval_batch_shardings, state_shape)
  return (train.lower(state_shape, train_batch_shape).compile(),
          evaluate.lower(state_shape.params, eval_batch_shape).compile())


def _lowered_flops(fn, *structs) -> float:
  """XLA's FLOP count of `fn` lowered (not compiled) for one CPU device, without a mesh: the whole step's FLOPs
  before partitioning. Lowered for CPU because accelerator plugins do not analyse uncompiled HLO. 0.0 if the CPU
  backend is not loaded (JAX_PLATFORMS without cpu)."""
  try:
    cpu = jax.devices("cpu")[:1]
  except RuntimeError:
    return 0.0
  plain = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  one_device = jax.sharding.Mesh(np.asarray(cpu).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  with jax.set_mesh(one_device), jax.default_device(cpu[0]):
    cost = jax.jit(fn).lower(*map(plain, structs)).cost_analysis() or {}
  return float(cost.get("flops", 0.0))


def train_step_flops(model_config, objective, tx, train_config: TrainConfig, state_shape, train_batch_shape) -> float:
  """The compiler's FLOP count of one train step on the whole global batch, every loop multiplied out.

  XLA's cost analysis counts a while-loop body once, so a compiled step's own count misses all but one layer and
  one micro-batch. Here the step is lowered with the layer scan and the LM term's chunk loop unrolled and the batch
  ([accum, micro, T]) as one micro-batch of accum x micro rows (the same FLOPs), and counted before partitioning:
  divide by the device count for a per-device figure. It includes what remat recomputes.
  """
  graphdef, _ = transformer.abstract_model(model_config, unroll_layers=True)
  one_micro = {k: jax.ShapeDtypeStruct((1, v.shape[0] * v.shape[1]) + tuple(v.shape[2:]), v.dtype)
               for k, v in train_batch_shape.items()}
  unrolled = dataclasses.replace(objective, unroll_lm_chunks=True)
  step = functools.partial(train_step, graphdef=graphdef, objective=unrolled, tx=tx,
                           freeze_trunk=train_config.freeze_trunk, ema_decay=train_config.ema_decay,
                           frozen_layers=frozen_layers(train_config, state_shape.params))
  return _lowered_flops(step, state_shape, one_micro)


def eval_step_flops(model_config, objective, params_shape, eval_batch_shape) -> float:
  """The compiler's FLOP count of one eval step, layers multiplied out (as train_step_flops)."""
  graphdef, _ = transformer.abstract_model(model_config, unroll_layers=True)
  unrolled = dataclasses.replace(objective, unroll_lm_chunks=True)
  return _lowered_flops(functools.partial(eval_step, graphdef=graphdef, objective=unrolled), params_shape,
                        eval_batch_shape)
