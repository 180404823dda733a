"""train.trainable_layers = K: only the top K decoder layers, the final norm and the heads move; embeddings and the
lower layers stay bit-identical and have no optimizer state, with stacked layers (a leading `layers` axis) and with
a per-layer tree alike."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.model import transformer
from lenvm_jax.train import optimizer
from tests.helpers import run_config


def _moment_elements(opt_state) -> int:
  """Elements in the Adam first moments (mu) anywhere in an optax state."""
  total = 0
  for leaf_state in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
    if isinstance(leaf_state, optax.ScaleByAdamState):
      total += sum(np.size(x) for x in jax.tree.leaves(leaf_state.mu))
  return total


def _run(params, labels_config: RunConfig, steps: int = 3):
  """A few optimizer steps on a loss that touches every parameter: (new params, opt state)."""
  tx = optimizer.make_optimizer(labels_config, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params))
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(x) * (1 + i)) for i, x in enumerate(jax.tree.leaves(p)))
  step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(tx.update(jax.grad(loss)(p),
                                                                                                s, p)))
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _config(num_layers: int, trainable_layers: int, **train) -> RunConfig:
  config = RunConfig.default("tiny").to_dict()
  config["model"]["num_layers"] = num_layers
  config["train"].update(trainable_layers=trainable_layers, **train)
  config["optim"].update(warmup_steps=0, lr=1e-2)
  return RunConfig.from_dict(config)


def _params(num_layers: int, stacked: bool) -> dict:
  """A model-shaped tree: `layers` as one stacked layer (a leading layers axis) or as {index: layer}."""
  rng = np.random.default_rng(0)
  layer = lambda lead: {"attn": {"q": rng.normal(size=lead + (4, 2, 2)).astype(np.float32)},
                        "norm": {"scale": np.ones(lead + (4,), np.float32)}}
  return jax.tree.map(jnp.asarray, {
      "embedding": rng.normal(size=(8, 4)).astype(np.float32),
      "layers": layer((num_layers,)) if stacked else {i: layer(()) for i in range(num_layers)},
      "final_norm": {"scale": np.ones(4, np.float32)},
      "value_head": {"fc": rng.normal(size=(4, 4)).astype(np.float32), "fc_bias": np.zeros(4, np.float32)}})


def layer_slices(layers, num_layers: int) -> list[list]:
  """Per layer index, its arrays, from a stacked or a per-layer tree."""
  if isinstance(layers, dict) and all(isinstance(k, int) or str(k).isdigit() for k in layers):
    return [jax.tree.leaves(layers[k]) for k in sorted(layers, key=int)]
  return [[x[i] for x in jax.tree.leaves(layers)] for i in range(num_layers)]


def _moved(a, b) -> bool:
  return bool(np.any(np.asarray(a) != np.asarray(b)))


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("num_layers, trainable_layers", [(3, 1), (3, 2)])
def test_only_the_top_k_layers_train_and_only_they_keep_moments(stacked, num_layers, trainable_layers):
  params = _params(num_layers, stacked)
  new, state = _run(params, _config(num_layers=num_layers, trainable_layers=trainable_layers))
  bottom = num_layers - trainable_layers
  for index, (old, moved) in enumerate(zip(layer_slices(params["layers"], num_layers),
                                           layer_slices(new["layers"], num_layers))):
    for a, b in zip(old, moved):
      if index < bottom:
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))  # Bit-identical.
      else:
        assert _moved(a, b)
  np.testing.assert_array_equal(np.asarray(new["embedding"]), np.asarray(params["embedding"]))
  heads = [x for name in ("final_norm", "value_head") for x in jax.tree.leaves(params[name])]
  assert all(_moved(a, b) for a, b in zip(heads, [x for name in ("final_norm", "value_head")
                                                  for x in jax.tree.leaves(new[name])]))
  per_layer = sum(np.size(x) for x in layer_slices(params["layers"], num_layers)[0])
  assert _moment_elements(state) == trainable_layers * per_layer + sum(x.size for x in heads)


@pytest.mark.slow
def test_zero_trains_everything():
  run = _config(num_layers=2, trainable_layers=0)
  params = jax.jit(lambda: transformer.init_params(run.model, seed=0))()
  new, state = _run(params, run, steps=2)
  assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))
  assert _moment_elements(state) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("train, message", [({"trainable_layers": -1}, "config.train.trainable_layers: must be >= 0"),
                                            ({"trainable_layers": 3}, "at most model.num_layers"),
                                            ({"trainable_layers": 1, "freeze_trunk": True}, "freeze_trunk")])
def test_bad_trainable_layers_are_config_errors(train, message):
  with pytest.raises(ConfigError, match=message):
    _config(num_layers=2, **train)


@pytest.mark.slow
def test_train_step_with_trainable_layers_moves_only_the_top(tiny_config):
  from lenvm_jax import sharding
  from lenvm_jax.data import pipeline
  from lenvm_jax.train import state as state_lib, step as step_lib
  from lenvm_jax.value.objective import Objective
  tiny_config.train.trainable_layers = 1
  tiny_config.optim.warmup_steps = 0
  run = run_config(tiny_config)
  graphdef, abstract = transformer.abstract_model(run.model)
  tx = optimizer.make_optimizer(run, abstract.to_pure_dict())
  state, _ = state_lib.create_train_state(run.model, tx, sharding.make_mesh(1, 1, 1), seed=0)
  batch = next(iter(pipeline.train_dataset(run, pipeline.load_source(run, "train"))))
  micro = {k: jnp.asarray(v[None]) for k, v in batch.items()}
  # Jitted, as the trainer runs it: one compile, not an eager dispatch (and compile) per op.
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, objective=Objective.from_config(run.loss),
                                   tx=tx, freeze_trunk=False,
                                   frozen_layers=step_lib.frozen_layers(run.train, state.params)))
  new_state, _ = step(state, micro)
  bottom = run.model.num_layers - 1
  old_layers = layer_slices(state.params["layers"], run.model.num_layers)
  new_layers = layer_slices(new_state.params["layers"], run.model.num_layers)
  for a, b in zip(old_layers[:bottom], new_layers[:bottom]):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert any(_moved(x, y) for x, y in zip(old_layers[bottom], new_layers[bottom]))
  np.testing.assert_array_equal(np.asarray(new_state.params["embedding"]), np.asarray(state.params["embedding"]))


@pytest.mark.slow
def test_frozen_layers_skip_the_backward_pass_but_keep_the_top_gradients():
  """model.hidden_states(frozen_layers=N): the same forward, the same gradients of the top layers and heads, and
  no gradient (no backward pass) for the embeddings and the bottom N layers."""
  from flax import nnx
  run = _config(num_layers=3, trainable_layers=1)
  graphdef, _ = transformer.abstract_model(run.model)
  params = jax.jit(lambda: transformer.init_params(run.model, seed=0))()
  tokens = jnp.asarray(np.arange(1, 9, dtype=np.int32)[None] % run.model.vocab_size)
  positions, segments = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32)

  @functools.partial(jax.jit, static_argnums=1)
  def loss_and_grads(params, frozen):
    def loss(p):
      model = nnx.merge(graphdef, p)
      return jnp.sum(model.value_logits(model.hidden_states(tokens, positions, segments, frozen_layers=frozen)))
    return jax.value_and_grad(loss)(params)

  (full_loss, full), (split_loss, split) = loss_and_grads(params, 0), loss_and_grads(params, 2)
  assert float(split_loss) == pytest.approx(float(full_loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(full["layers"]), jax.tree.leaves(split["layers"])):
    np.testing.assert_allclose(np.asarray(b[2]), np.asarray(a[2]), rtol=1e-4, atol=1e-7)
    assert not np.any(np.asarray(b[:2]))
  assert not np.any(np.asarray(split["embedding"]))
  for name in ("final_norm", "value_head"):
    for a, b in zip(jax.tree.leaves(full[name]), jax.tree.leaves(split[name])):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
