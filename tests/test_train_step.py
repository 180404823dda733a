import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lenvm_jax.model import transformer
from lenvm_jax import sharding
from lenvm_jax.data import pipeline
from lenvm_jax.value import objective as objective_lib
from lenvm_jax.value.objective import Objective
from lenvm_jax.train import state as state_lib, step as step_lib
from tests.helpers import run_config


def _setup(config, tx):
  model_config = run_config(config).model
  mesh = sharding.make_mesh(1, 1, 1)
  graphdef, _ = transformer.abstract_model(model_config)
  state, _ = state_lib.create_train_state(model_config, tx, mesh, seed=0)
  batch = next(iter(pipeline.train_dataset(run_config(config), pipeline.load_source(run_config(config), "train"))))
  return graphdef, state, batch


@pytest.mark.slow
# The value term alone, then with the LM term on every third position and weighted boundary states (one compile per
# split each: the cost of this test).
@pytest.mark.parametrize("lm_weight,boundary_weight,lm_stride", [(0.0, 1.0, 1), (0.5, 8.0, 3)])
def test_gradient_does_not_depend_on_how_the_batch_is_split(tiny_config, lm_weight, boundary_weight, lm_stride):
  """Token-mean over the global batch: 1 or 4 micro-batches give the same loss and the same SGD update."""
  config = tiny_config
  config.loss.lm_weight = lm_weight
  config.loss.boundary_weight = boundary_weight
  config.loss.lm_stride = lm_stride
  tx = optax.sgd(1.0)  # The update is exactly -grad, so any denominator error shows.
  graphdef, state, batch = _setup(config, tx)
  counts = batch["value_mask"].sum(axis=1)
  assert len(set(counts.tolist())) > 1  # Rows differ in valid tokens: a per-micro-batch mean would be wrong.
  objective = Objective.from_config(run_config(config).loss)
  results = []
  # Jitted, as the trainer runs it: one compile per split, not an eager dispatch (and compile) per op.
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, objective=objective, tx=tx,
                                   freeze_trunk=False))
  for accum in (1, 4):  # Rows of unequal valid tokens in every micro-batch split (2 would be the same program).
    micro = {k: jnp.asarray(v.reshape((accum, -1) + v.shape[1:])) for k, v in batch.items()}
    new_state, out = step(state, micro)
    results.append((float(out["loss"]), new_state.params))
  for loss, params in results[1:]:
    assert loss == pytest.approx(results[0][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_boundary_weight_counts_each_prompt_boundary_state_that_many_times(tiny_config):
  from lenvm_jax.data import rows
  from lenvm_jax.data.records import Trajectory
  gamma = 0.9
  tiny_config.loss.gamma = gamma
  # Two packed sequences: prompts of 3 and 2 tokens, completions of 4 and 1 (s_0 at columns 2 and 8), then padding
  # (whose completion_index pads to 0 too: only the value mask tells it apart).
  parts = [rows.trajectory_to_row(Trajectory(np.full(p, 7, np.int32), np.full(n, 9, np.int32), True), 16)
           for p, n in ((3, 4), (2, 1))]
  batch = {k: jnp.asarray(np.pad(np.concatenate([r[k] for r in parts]), (0, 16 - 10))[None])
           for k in ("value_mask", "remaining", "completion_index", "lm_mask")}
  z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16)), jnp.float32)
  error = np.asarray((-jax.nn.sigmoid(z) + (1 - gamma ** batch["remaining"].astype(np.float32))) ** 2)[0]
  valid = np.asarray(batch["value_mask"][0])
  boundary = np.flatnonzero((np.asarray(batch["completion_index"][0]) == 0) & valid)
  np.testing.assert_array_equal(boundary, [2, 8])
  for weight in (1.0, 5.0):
    tiny_config.loss.boundary_weight = weight
    objective = Objective.from_config(run_config(tiny_config).loss)
    loss = objective.loss(objective.sums(z, None, batch), *objective.token_counts(batch))
    weights = valid.astype(np.float64)
    weights[boundary] = weight
    assert float(loss) == pytest.approx(np.sum(weights * error) / np.sum(weights), rel=1e-5)
  assert weights.sum() == valid.sum() + 2 * 4


@pytest.mark.slow
def test_lm_term_is_the_mean_cross_entropy_of_every_stride_th_position(tiny_config):
  """The LM term against a numpy cross-entropy over the masked positions 0, k, 2k, ... of each row (k = 1 and 4)."""
  tiny_config.loss.lm_weight, tiny_config.loss.value_weight = 1.0, 0.0
  graphdef, state, batch = _setup(tiny_config, optax.sgd(1.0))
  objective = Objective.from_config(run_config(tiny_config).loss)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @functools.partial(jax.jit, static_argnums=0)
  def lm_term(stride, params):  # Jitted: one compile per stride, not a dispatch (and compile) per op.
    strided = dataclasses.replace(objective, lm_stride=stride)
    z, lm_head, _ = step_lib.forward_heads(graphdef, params, batch, freeze_trunk=False, objective=strided)
    return strided.loss(strided.sums(z, lm_head, batch), *strided.token_counts(batch)), lm_head.hidden, lm_head.weight

  _, full_hidden, weight = lm_term(1, state.params)
  logits = np.asarray(transformer.lm_logits(full_hidden, weight), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets, mask = np.asarray(batch["lm_targets"]), np.asarray(batch["lm_mask"]).astype(bool)
  ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  for stride in (1, 4):
    loss, hidden, _ = lm_term(stride, state.params)
    picked = np.zeros_like(mask)
    picked[:, ::stride] = True
    assert (mask & ~picked).any() or stride == 1  # The stride drops some LM positions.
    assert float(loss) == pytest.approx(ce[mask & picked].mean(), rel=1e-5), stride
    assert hidden.shape[1] == -(-batch["tokens"].shape[1] // stride)


def test_chunked_lm_cross_entropy_equals_the_whole_rows_with_its_gradients():
  """loss.lm_chunk: every chunk length (dividing the rows or not, one position, longer than the row) gives today's
  sum and the same gradients in hidden states and head, in float32; only masked positions count."""
  rng = np.random.default_rng(0)
  batch, length, width, vocab = 3, 37, 16, 50
  hidden = jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(width, vocab)) / 4, jnp.float32)
  labels = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  mask = jnp.asarray(rng.random((batch, length)) < 0.7)
  value_and_grads = lambda chunk: jax.jit(jax.value_and_grad(
      lambda h, w: objective_lib.lm_cross_entropy_sum(h, w, labels, mask, chunk), argnums=(0, 1)))(hidden, weight)
  whole, (d_hidden, d_weight) = value_and_grads(0)
  logits = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.sum(np.asarray(mask) * np.take_along_axis(log_probs, np.asarray(labels)[..., None], -1)[..., 0])
  assert float(whole) == pytest.approx(expected, rel=1e-5)
  assert not np.any(np.asarray(d_hidden)[~np.asarray(mask)])  # Masked positions get no gradient.
  for chunk in (1, 5, 8, 36, 37, 64):
    loss, (h, w) = value_and_grads(chunk)
    assert float(loss) == pytest.approx(float(whole), rel=1e-6), chunk
    np.testing.assert_allclose(h, d_hidden, rtol=1e-5, atol=1e-7, err_msg=f"chunk {chunk}")
    np.testing.assert_allclose(w, d_weight, rtol=1e-5, atol=1e-6, err_msg=f"chunk {chunk}")


@pytest.mark.slow
def test_train_step_with_a_chunked_lm_term_equals_the_unchunked_one(tiny_config):
  """The whole train step (value + LM term, two micro-batches): the same loss and SGD update for every loss.lm_chunk.
  Every position (48 per row: chunks of 1 and 16 divide it) and every third (16: chunks of 7 do not divide it); the
  chunk lengths' edge cases are test_chunked_lm_cross_entropy_equals_the_whole_rows_with_its_gradients's."""
  tiny_config.loss.lm_weight = 0.5
  tx = optax.sgd(1.0)
  graphdef, state, batch = _setup(tiny_config, tx)
  micro = {k: jnp.asarray(v.reshape((2, -1) + v.shape[1:])) for k, v in batch.items()}
  objective = Objective.from_config(run_config(tiny_config).loss)
  for lm_stride, chunks in ((1, (0, 1, 16)), (3, (0, 7))):
    results = {}
    for chunk in chunks:
      step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, freeze_trunk=False,
                                       objective=dataclasses.replace(objective, lm_chunk=chunk, lm_stride=lm_stride)))
      new_state, out = step(state, micro)
      results[chunk] = (float(out["loss"]), new_state.params)
    for chunk, (loss, params) in results.items():
      assert loss == pytest.approx(results[0][0], rel=1e-6), (lm_stride, chunk)
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"stride {lm_stride}, chunk {chunk}")


@pytest.mark.slow
def test_train_step_drops_out_with_the_state_rng_and_evaluation_does_not(tiny_config):
  tx = optax.sgd(1.0)  # The update is -grad: it shows the masks.
  tiny_config.model.dropout_rate = 0.0
  graphdef_plain, state, batch = _setup(tiny_config, tx)
  tiny_config.model.dropout_rate = 0.3
  graphdef, _ = transformer.abstract_model(run_config(tiny_config).model)
  objective = Objective.from_config(run_config(tiny_config).loss)
  micro = {k: jnp.asarray(v[None]) for k, v in batch.items()}
  jitted = {id(g): jax.jit(functools.partial(step_lib.train_step, graphdef=g, objective=objective, tx=tx,
                                             freeze_trunk=False)) for g in (graphdef, graphdef_plain)}
  step = lambda g, s: jitted[id(g)](s, micro)[0]
  # The trunk's update: the value head's bias gradient barely depends on the masks.
  update = lambda new, old: np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new.params["layers"]),
                                                                           jax.tree.leaves(old.params["layers"]))])
  dropped, again, plain = step(graphdef, state), step(graphdef, state), step(graphdef_plain, state)
  np.testing.assert_array_equal(update(dropped, state), update(again, state))  # The state's rng decides the masks.
  differs = lambda a, b: np.linalg.norm(a - b) > 0.05 * np.linalg.norm(b)
  assert differs(update(dropped, state), update(plain, state))
  assert differs(update(step(graphdef, dropped.replace(params=state.params)), state), update(dropped, state))
  evaluate = lambda g: jax.jit(functools.partial(step_lib.eval_step, graphdef=g, objective=objective))(
      state.params, {k: jnp.asarray(v) for k, v in batch.items()})["objective/value_sq_err"]
  assert float(evaluate(graphdef)) == float(evaluate(graphdef_plain))


@pytest.mark.slow
def test_frozen_trunk_trains_only_the_value_head(tiny_config):
  config = tiny_config
  config.train.freeze_trunk = True
  from lenvm_jax.train import optimizer
  model_config = run_config(config).model
  graphdef, abstract = transformer.abstract_model(model_config)
  tx = optimizer.make_optimizer(run_config(config), abstract.to_pure_dict())
  graphdef, state, batch = _setup(config, tx)
  micro = {k: jnp.asarray(v[None]) for k, v in batch.items()}
  new_state = state
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef,
                                   objective=Objective.from_config(run_config(config).loss), tx=tx, freeze_trunk=True))
  for _ in range(2):  # The warmup schedule starts at lr 0: the second step moves the head.
    new_state, _ = step(new_state, micro)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
  assert all(jax.tree.leaves(changed["value_head"]))
  assert not any(jax.tree.leaves({k: v for k, v in changed.items() if k != "value_head"}))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_trainer_reports_nonfinite_losses_loudly(tiny_config, tmp_path, policy, caplog):
  from lenvm_jax.train import trainer
  config = tiny_config
  config.optim.lr = 1e30  # The first update overflows the parameters; every later loss is non-finite.
  config.optim.warmup_steps = 0
  config.train.steps = 4
  config.train.eval_every = 0
  config.train.nonfinite = policy
  config.mesh.data = 1
  if policy == "stop":
    with pytest.raises(FloatingPointError, match="train.nonfinite='stop'"):
      trainer.train_and_evaluate(run_config(config), str(tmp_path))
    return
  from lenvm_jax import errors
  from lenvm_jax.run import checkpoint_layout
  ended = r"the run ended on 3 non-finite step\(s\) in a row \(step 4\): its state is not checkpointed"
  with caplog.at_level("WARNING"), pytest.raises(errors.NonFiniteError, match=ended):
    trainer.train_and_evaluate(run_config(config), str(tmp_path))
  assert "non-finite loss or gradient" in caplog.text
  assert checkpoint_layout.complete_steps(str(tmp_path)) == []  # The diverged weights were never checkpointed.
  import json
  last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-2]
  assert last["split"] == "train" and last["nonfinite_skips"] >= 1
  # A window of skipped steps reports NaN metrics, not the zeros of its empty sums.
  assert np.isnan(last["loss"]) and np.isnan(last["value_mse"])


@pytest.mark.slow
def test_train_records_average_the_whole_logging_window(tiny_config, tmp_path):
  import json
  from lenvm_jax.train import trainer

  def train_records(log_every):
    config = tiny_config.copy_and_resolve_references()
    config.train.steps, config.train.log_every, config.train.eval_every = 4, log_every, 0
    config.checkpoint.every_steps, config.mesh.data = 100, 1
    workdir = tmp_path / f"log_every_{log_every}"
    trainer.train_and_evaluate(run_config(config), str(workdir))
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == "train"}

  every_step, windowed = train_records(1), train_records(2)
  assert sorted(windowed) == [2, 4]
  for end in (2, 4):
    pair = [every_step[end - 1], every_step[end]]
    # Same seed, same batches: a window's loss and gradient norm are the means of its steps' ...
    assert windowed[end]["loss"] == pytest.approx(np.mean([r["loss"] for r in pair]), rel=1e-6)
    assert windowed[end]["grad_norm"] == pytest.approx(np.mean([r["grad_norm"] for r in pair]), rel=1e-6)
    # ... and its spec metrics are token means over both batches: between the two steps' values, not the last one's.
    for name in ("value_mse", "length_mae"):
      low, high = sorted(r[name] for r in pair)
      assert low - 1e-6 <= windowed[end][name] <= high + 1e-6
      assert windowed[end][name] != pytest.approx(pair[1][name], rel=1e-6)


@pytest.mark.slow
def test_ema_follows_the_parameters_with_a_ramped_decay_and_skips_nonfinite_steps(tiny_config):
  """The EMA's ramped decay; a non-finite step (NaN value head) is skipped: parameters, EMA kept, the skip counted."""
  tx = optax.sgd(0.1)
  model_config = run_config(tiny_config).model
  graphdef, _ = transformer.abstract_model(model_config)
  state, _ = state_lib.create_train_state(model_config, tx, sharding.make_mesh(1, 1, 1), seed=0, ema=True)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)
  batch = next(iter(pipeline.train_dataset(run_config(tiny_config), pipeline.load_source(run_config(tiny_config), "train"))))
  micro = {k: jnp.asarray(v[None]) for k, v in batch.items()}
  jitted = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef,
                                     objective=Objective.from_config(run_config(tiny_config).loss), tx=tx,
                                     freeze_trunk=False, ema_decay=0.99))
  step = lambda s: jitted(s, micro)[0]
  # (1 + t) / (10 + t) caps the decay at the first updates: 0.1 after update 0, 2 / 11 after update 1.
  expected = state.params
  for rate in (0.1, 2 / 11):
    state = step(state)
    expected = jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, expected, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.ema_params, expected)
  assert not np.allclose(state.ema_params["value_head"]["summary"], state.params["value_head"]["summary"])
  poisoned = state.replace(params={**state.params, "value_head": jax.tree.map(
      lambda p: jnp.full_like(p, jnp.nan), state.params["value_head"])})
  skipped, out = jitted(poisoned, micro)
  assert not bool(out["finite"]) and int(skipped.nonfinite_skips) == 1 and int(skipped.step) == int(state.step) + 1
  jax.tree.map(np.testing.assert_array_equal, skipped.ema_params, state.ema_params)
  jax.tree.map(np.testing.assert_array_equal, skipped.params["layers"], state.params["layers"])  # Finite: kept.


@pytest.mark.slow
def test_a_run_with_ema_is_evaluated_and_served_with_its_ema_weights(tiny_config, tmp_path):
  from lenvm_jax.decoding.predict import Predictor
  from lenvm_jax.train import checkpointing, optimizer, trainer
  config = tiny_config
  config.train.steps, config.train.eval_every, config.mesh.data = 6, 0, 1
  config.train.ema_decay = 0.9
  final_eval = trainer.train_and_evaluate(run_config(config), str(tmp_path))
  predictor = Predictor(str(tmp_path))
  model_config = run_config(config).model
  _, abstract = transformer.abstract_model(model_config)
  tx = optimizer.make_optimizer(run_config(config), abstract.to_pure_dict())
  target, _ = state_lib.create_train_state(model_config, tx, sharding.make_mesh(1, 1, 1), 0, initialize=False,
                                           ema=True)
  ckpt = checkpointing.Checkpointer(str(tmp_path), 1, 1, False)
  saved = ckpt.restore_train_state(ckpt.latest_step(), target)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, predictor.params, saved.ema_params)
  head = lambda p: np.asarray(p["value_head"]["summary"])
  assert not np.allclose(head(saved.ema_params), head(saved.params))
  # The trainer's final eval used the EMA weights: re-evaluating them gives its value MSE, the raw weights do not.
  source = pipeline.load_source(run_config(config), "eval")
  trajectories = [source[i] for i in range(len(source))]

  def value_mse():
    values = predictor.predict(trajectories, max_len=config.data.max_len)
    return float(np.mean(np.concatenate([
        (v - (-(1 - config.loss.gamma ** (len(t.completion_ids) - np.arange(len(v)))))) ** 2
        for t, (v, _) in zip(trajectories, values)])))

  assert value_mse() == pytest.approx(final_eval["value_mse"], rel=1e-4)
  predictor.params = saved.params
  assert value_mse() != pytest.approx(final_eval["value_mse"], rel=1e-4)


@pytest.mark.slow
def test_checkpoints_restore_whether_or_not_they_and_the_target_keep_an_ema(tiny_config, tmp_path):
  import dataclasses
  import orbax.checkpoint as ocp
  from lenvm_jax.train import checkpointing
  tx = optax.adamw(1e-3)
  model_config = run_config(tiny_config).model
  mesh = sharding.make_mesh(1, 1, 1)
  plain, _ = state_lib.create_train_state(model_config, tx, mesh, seed=0)
  with_ema, _ = state_lib.create_train_state(model_config, tx, mesh, seed=1, ema=True)
  with_ema = with_ema.replace(ema_params=jax.tree.map(lambda p: p + 1.0, with_ema.params))
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=5, async_save=False)
  # Step 1: a checkpoint from before TrainState had ema_params (its stored tree has no such key).
  old_layout = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain) if f.name != "ema_params"}
  ckpt.manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(old_layout)))
  ckpt.manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(with_ema)))
  ckpt.wait()
  target = lambda ema: state_lib.create_train_state(model_config, tx, mesh, 0, initialize=False, ema=ema)[0]
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  restored = ckpt.restore_train_state(1, target(False))
  assert restored.ema_params is None
  same(restored.params, plain.params)
  restored = ckpt.restore_train_state(1, target(True))  # EMA turned on at resume: it starts at the restored weights.
  same(restored.ema_params, plain.params)
  same(ckpt.restore_train_state(2, target(True)).ema_params, with_ema.ema_params)
  restored = ckpt.restore_train_state(2, target(False))  # EMA turned off: dropped.
  assert restored.ema_params is None
  same(restored.params, with_ema.params)
  same(restored.opt_state, with_ema.opt_state)
  ckpt.close()
