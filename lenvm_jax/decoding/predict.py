"""Per-token values and predicted remaining lengths from a trained run (its workdir)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.run import checkpoint_restore, config_history
from lenvm_jax.data import rows
from lenvm_jax.data.records import Trajectory
from lenvm_jax.decoding.sampler import bucket_width
from lenvm_jax.model.transformer import abstract_model
from lenvm_jax.value.objective import Objective


class Predictor:
  """Loads a workdir's weights (its EMA when the run keeps one) on one device, with the config that trained them,
  and scores trajectories. `step`: None or "latest" (the newest checkpoint that restores intact), "best" (by the
  run's checkpoint.keep_best) or a step number."""

  def __init__(self, workdir: str, step: int | str | None = None):
    current = config_history.read_config(workdir)
    mesh = sharding.make_mesh(1, 1, 1)
    with jax.set_mesh(mesh):
      _, abstract = abstract_model(current.model)
      self.params, self.step = checkpoint_restore.restore_params(workdir, checkpoint_restore.abstract_params_on(abstract, mesh), step,
                                                     keep_best=current.checkpoint.keep_best)
    self.config = config_history.read_config(workdir, self.step)  # A resumed run may have trained this step with another.
    self.graphdef, _ = abstract_model(self.config.model)
    self.kind = Objective.from_config(self.config.loss).kind
    self._forward = jax.jit(self._values)

  def _values(self, params, tokens, positions, segment_ids):
    """V and n_hat; n_hat from the head's logit (exact where V rounds to -1 in float32: past ~5,300 tokens at gamma
    0.997, the paper's answers run to 16,000)."""
    z = nnx.merge(self.graphdef, params)(tokens, positions, segment_ids)
    return self.kind.value_estimate(self.kind.predict(z)), self.kind.remaining_from_logit(z)

  def predict(self, trajectories: list[Trajectory], batch_size: int = 16, max_len: int | None = None,
              max_prompt_len: int = 0, prompt_cut: str | None = None):
    """For each trajectory: (values, remaining) at s_0 .. s_L, i.e. len(completion_ids) + 1 entries each.

    With max_len, sequences are cut at max_len tokens (as in training) and only the states present are returned;
    max_prompt_len > 0 cuts longer prompts as training did (prompt_cut: the run's data.prompt_cut unless given).
    Sequences are batched by length (least padding) and returned in input order.
    """
    if max_prompt_len:
      prompt_cut = prompt_cut or self.config.data.prompt_cut
      trajectories = [dataclasses.replace(t, prompt_ids=rows.cut_prompt(t.prompt_ids, max_prompt_len, prompt_cut))
                      for t in trajectories]
    out = [None] * len(trajectories)
    order = sorted(range(len(trajectories)),
                   key=lambda i: len(trajectories[i].prompt_ids) + len(trajectories[i].completion_ids))
    for start in range(0, len(order), batch_size):
      chunk = order[start:start + batch_size]
      ids = [np.concatenate([trajectories[i].prompt_ids, trajectories[i].completion_ids])[:max_len] for i in chunk]
      width = bucket_width(max(map(len, ids)), 16)
      tokens = np.zeros((batch_size, width), np.int32)
      segment_ids = np.zeros((batch_size, width), np.int32)
      for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = seq
        segment_ids[row, :len(seq)] = 1
      positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
      values, remaining = jax.device_get(self._forward(self.params, jnp.asarray(tokens), jnp.asarray(positions),
                                                       jnp.asarray(segment_ids)))
      for row, (i, seq) in enumerate(zip(chunk, ids)):
        first = len(trajectories[i].prompt_ids) - 1
        span = slice(first, min(first + len(trajectories[i].completion_ids) + 1, len(seq)))
        out[i] = (values[row, span], remaining[row, span])
    return out

  def predict_prompts(self, prompts: list[Trajectory], batch_size: int = 16, max_prompt_len: int = 0):
    """(V(s_0) [N], L_hat [N]): value and predicted completion length at each prompt boundary (docs/method.md §8)."""
    empty = [dataclasses.replace(t, completion_ids=t.completion_ids[:0]) for t in prompts]
    out = self.predict(empty, batch_size=batch_size, max_prompt_len=max_prompt_len)
    return np.asarray([v[0] for v, _ in out]), np.asarray([n[0] for _, n in out])
