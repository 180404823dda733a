"""Per-token values and predicted remaining lengths from a trained run (its workdir)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lenvm_jax import sharding
from lenvm_jax.objective import Objective
from lenvm_jax.data.records import Trajectory
from lenvm_jax.train import checkpointing, config as config_lib, optimizer, state as state_lib


class Predictor:
  """Loads the latest checkpoint of a workdir on one device and scores trajectories."""

  def __init__(self, workdir: str):
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      self.config = ml_collections.ConfigDict(json.load(f))
    model_config = config_lib.validate(self.config)
    self.kind = Objective.from_config(self.config).kind
    mesh = sharding.make_mesh(1, 1, 1)
    ckpt = checkpointing.Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {ckpt.directory}")
    with jax.set_mesh(mesh):
      self.graphdef, abstract = state_lib.abstract_model(model_config)
      tx = optimizer.make_optimizer(self.config, abstract.to_pure_dict())
      target, _ = state_lib.create_train_state(model_config, tx, mesh, self.config.seed, initialize=False)
      self.params = ckpt.restore(step, target).params
    ckpt.close()
    self.step = step
    self._forward = jax.jit(self._values)

  def _values(self, params, tokens, positions, segment_ids):
    from flax import nnx
    z = nnx.merge(self.graphdef, params)(tokens, positions, segment_ids)
    prediction = self.kind.predict(z)
    return self.kind.value_estimate(prediction), self.kind.remaining_estimate(prediction)

  def predict(self, trajectories: list[Trajectory], batch_size: int = 16):
    """For each trajectory: (values, remaining) at s_0 .. s_L, i.e. len(completion_ids) + 1 entries each."""
    out = []
    for start in range(0, len(trajectories), batch_size):
      chunk = trajectories[start:start + batch_size]
      longest = max(len(t.prompt_ids) + len(t.completion_ids) for t in chunk)
      width = 1 << max(int(np.ceil(np.log2(longest))), 4)  # Bucketed lengths: few recompiles.
      tokens = np.zeros((batch_size, width), np.int32)
      segment_ids = np.zeros((batch_size, width), np.int32)
      for i, t in enumerate(chunk):
        ids = np.concatenate([t.prompt_ids, t.completion_ids])
        tokens[i, :len(ids)] = ids
        segment_ids[i, :len(ids)] = 1
      positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
      values, remaining = jax.device_get(self._forward(self.params, jnp.asarray(tokens), jnp.asarray(positions),
                                                       jnp.asarray(segment_ids)))
      for i, t in enumerate(chunk):
        first = len(t.prompt_ids) - 1
        span = slice(first, first + len(t.completion_ids) + 1)
        out.append((values[i, span], remaining[i, span]))
    return out
