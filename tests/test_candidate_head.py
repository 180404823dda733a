"""The candidate-value head (model/candidate_head.py) and its loss (value/candidate.py): targets, masks, the head's
two token-vector layouts, config checks, sharding.

Over ~350 lines: the head, its loss, its scorer and its run, one concept end to end.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import rows
from lenvm_jax.data.records import Trajectory
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import LengthValueModel
from lenvm_jax.value import candidate, targets
from lenvm_jax.value.objective import Objective
from tests.helpers import run_config, tiny_model

GAMMA = 0.9
EOS = 1
WIDTH = 24


def _packed_batch():
  """Two rows. Row 0 packs two finished sequences (prompts 3 and 2 tokens, completions 4 and 2 ending in EOS) and
  padding; row 1 holds one sequence cut at the row's end (its last column has no next state in the row)."""
  def traj(prompt, completion, finished=True):
    return rows.trajectory_to_row(Trajectory(np.asarray(prompt, np.int32), np.asarray(completion, np.int32),
                                             finished), WIDTH)

  first = traj([7, 8, 9], [10, 11, 12, EOS])
  second = traj([13, 14], [15, EOS])
  long = traj([7, 8], list(range(20, 20 + 40)) + [EOS])  # Cut at WIDTH: 22 completion tokens present.
  packed = {}
  for key in (rows.TOKENS, rows.VALUE_MASK, rows.REMAINING, rows.COMPLETION_INDEX, rows.LM_MASK):
    packed[key] = np.concatenate([first[key], second[key]])
  packed[rows.SEGMENT_IDS] = np.concatenate([np.full(len(first[rows.TOKENS]), 1), np.full(len(second[rows.TOKENS]), 2)])
  packed[rows.POSITIONS] = np.concatenate([first[rows.POSITIONS], second[rows.POSITIONS]])
  batch = {k: np.stack([np.pad(packed[k], (0, WIDTH - len(packed[k]))), long[k]]) for k in packed}
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_candidate_positions_targets_and_tokens_never_cross_padding_or_segments():
  batch = _packed_batch()
  mask = np.asarray(candidate.next_state_mask(batch))
  # Row 0: sequence 1 has value positions 2..6 (prompt's last token .. EOS), sequence 2 has 8..10; each position
  # but a sequence's last (EOS) has a next state. Column 6 -> 7 would cross into sequence 2; 10 -> 11 into padding.
  np.testing.assert_array_equal(np.flatnonzero(mask[0]), [2, 3, 4, 5, 8, 9])
  # Row 1: value positions 1..23 (cut); the row's last column has no next state in the row.
  np.testing.assert_array_equal(np.flatnonzero(mask[1]), np.arange(1, 23))

  g = np.asarray(targets.discounted_return(batch[rows.REMAINING], GAMMA))
  next_targets = np.asarray(candidate.next_state_targets(jnp.asarray(g), batch))
  tokens = np.asarray(batch[rows.TOKENS])
  next_tokens = np.asarray(candidate.next_tokens(batch))
  for row in range(2):
    for t in np.flatnonzero(mask[row]):
      assert next_tokens[row, t] == tokens[row, t + 1]
      expected = 0.0 if tokens[row, t + 1] == EOS else g[row, t + 1]
      assert next_targets[row, t] == pytest.approx(expected, abs=1e-7)
  # The next token EOS gets target 0: positions 5 and 9 of row 0 (the states just before EOS).
  assert next_tokens[0, 5] == next_tokens[0, 9] == EOS
  assert next_targets[0, 5] == next_targets[0, 9] == 0.0
  # Before EOS the target is G of the next state, one token shorter: -(1 - gamma ** (n_t - 1)).
  assert next_targets[0, 2] == pytest.approx(-(1 - GAMMA ** 3), rel=1e-6)


@pytest.mark.parametrize("gae_lambda", [1.0, 0.7])
def test_candidate_loss_is_the_token_mean_of_next_state_errors(tiny_config, gae_lambda):
  """loss = value MSE + candidate_weight x mean over candidate positions of (Q(s_t, a) - target(s_{t+1}))^2, with
  the next state's target as the value loss computes it (Monte-Carlo G or the GAE target)."""
  tiny_config.loss.gamma = GAMMA
  tiny_config.loss.gae_lambda = gae_lambda
  tiny_config.loss.candidate_weight = 0.5
  tiny_config.model.candidate_head = "table"
  objective = Objective.from_config(run_config(tiny_config).loss)
  batch = _packed_batch()
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, WIDTH)), jnp.float32)
  candidate_z = jnp.asarray(rng.normal(size=(2, WIDTH)), jnp.float32)
  sums = objective.sums(z, None, batch, candidate_z)
  value_count, lm_count = objective.token_counts(batch)
  loss = objective.loss(sums, value_count, lm_count, candidate.count(batch))

  value_mask = np.asarray(batch[rows.VALUE_MASK]).astype(bool)
  prediction = np.asarray(-jax.nn.sigmoid(z))
  value_target = np.asarray(objective.value_targets(jnp.asarray(prediction), batch))
  q = np.asarray(-jax.nn.sigmoid(candidate_z))
  errors = []
  for row in range(2):
    for t in range(WIDTH - 1):
      same = batch[rows.SEGMENT_IDS][row, t] == batch[rows.SEGMENT_IDS][row, t + 1] != 0
      if value_mask[row, t] and value_mask[row, t + 1] and same:
        target = 0.0 if batch[rows.REMAINING][row, t + 1] == 0 else value_target[row, t + 1]
        errors.append((q[row, t] - target) ** 2)
  assert len(errors) == 6 + 22 == int(candidate.count(batch))
  value_mse = np.sum(value_mask * (prediction - value_target) ** 2) / value_mask.sum()
  assert float(loss) == pytest.approx(value_mse + 0.5 * np.mean(errors), rel=1e-5)
  if gae_lambda < 1:  # The GAE target differs from the Monte-Carlo one, so the test sees which is used.
    mc = np.asarray(targets.discounted_return(batch[rows.REMAINING], GAMMA))
    assert not np.allclose(value_target[value_mask], mc[value_mask])


def test_without_candidate_weight_the_model_and_objective_are_unchanged(tiny_config):
  run = run_config(tiny_config)
  assert run.loss.candidate_weight == 0.0 and run.model.candidate_head == "none"
  assert "candidate_head" not in nnx.state(nnx.eval_shape(lambda: LengthValueModel(run.model, nnx.Rngs(0))))
  batch = _packed_batch()
  objective = Objective.from_config(run.loss)
  assert set(objective.sums(jnp.zeros((2, WIDTH)), None, batch)) == {"value_sq_err"}


def test_config_checks_name_the_field(tiny_config):
  tiny_config.loss.candidate_weight = 1.0
  with pytest.raises(ConfigError, match=r"config\.model\.candidate_head: is 'none'"):
    run_config(tiny_config)
  tiny_config.loss.candidate_weight = 0.0
  tiny_config.model.candidate_head = "tied"
  with pytest.raises(ConfigError, match=r"config\.loss\.candidate_weight: is 0"):
    run_config(tiny_config)
  tiny_config.model.candidate_head = "shared"
  with pytest.raises(ConfigError, match=r"config\.model\.candidate_head"):
    run_config(tiny_config)
  tiny_config.model.candidate_head = "tied"
  tiny_config.loss.candidate_weight = -1.0
  with pytest.raises(ConfigError, match=r"config\.loss\.candidate_weight: must be"):
    run_config(tiny_config)


def _model(head: str, seed: int = 0) -> LengthValueModel:
  """Initialised under jit (eager init is hundreds of small dispatches)."""
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "candidate_head": head})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LengthValueModel(config, nnx.Rngs(seed))))
  params = jax.jit(lambda: nnx.split(LengthValueModel(config, nnx.Rngs(seed)))[1])()
  return nnx.merge(graphdef, params)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["table", "tied"])
def test_candidate_logits_gather_the_all_token_columns(head):
  model = _model(head)
  state = nnx.state(model).to_pure_dict()["candidate_head"]
  assert ("table" in state) == (head == "table")
  hidden = jax.random.normal(jax.random.key(1), (3, 5, model.config.hidden_size))
  ids = jax.random.randint(jax.random.key(2), (3, 5, 4), 0, 64)
  every, gathered = jax.jit(lambda h, i: (model.candidate_logits(h), model.candidate_logits(h, i)))(hidden, ids)
  assert every.shape == (3, 5, 64)
  np.testing.assert_allclose(gathered, jnp.take_along_axis(every, ids, axis=-1), rtol=1e-5, atol=1e-6)
  base = model.value_logits(hidden)[..., None]
  if head == "table":  # Zero rows: an untrained head predicts the current state's value for every token.
    np.testing.assert_allclose(every, jnp.broadcast_to(base, every.shape), rtol=1e-6)
  else:  # Tied: the input embedding rows are the token vectors.
    g = model.candidate_head.features(hidden)
    np.testing.assert_allclose(every - base, g @ model.embedding[...].T, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_candidate_loss_never_trains_the_value_head_and_the_head_shares_the_trunk():
  model = _model("table")
  model.candidate_head.table[...] = jax.random.normal(jax.random.key(3), model.candidate_head.table.shape)
  graphdef, params = nnx.split(model)
  hidden_ids = jax.random.randint(jax.random.key(4), (2, 6), 2, 64)

  def candidate_only(params):
    m = nnx.merge(graphdef, params)
    hidden = m.hidden_states(hidden_ids, jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32))
    return jnp.sum(m.candidate_logits(hidden, hidden_ids[..., None]) ** 2)

  grads = nnx.State(jax.jit(jax.grad(candidate_only))(params)).to_pure_dict()
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["value_head"]))
  assert float(jnp.abs(grads["final_norm"]["scale"]).max()) > 0  # The trunk learns from it.
  assert float(jnp.abs(grads["candidate_head"]["out"]).max()) > 0


def test_the_token_axis_is_sharded_over_tensor():
  mesh = sharding.make_mesh(1, 2, 4)
  abstract = nnx.state(nnx.eval_shape(lambda: _model("table")))
  shardings = sharding.param_shardings(abstract, mesh)["candidate_head"]
  assert shardings["table"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert shardings["bias"].spec == jax.sharding.PartitionSpec("tensor")


@pytest.mark.slow
@pytest.mark.parametrize("head", ["table", "tied"])
def test_train_step_with_the_candidate_loss_does_not_depend_on_the_split(tiny_config, head):
  """The candidate term is a token mean over the global batch too: 1 and 4 micro-batches give the same loss and
  update; its metrics come out of the step (synthetic data: both scorers against the exact next-state value)."""
  import optax
  from lenvm_jax.data import pipeline
  from lenvm_jax.model import transformer
  from lenvm_jax.train import state as state_lib, step as step_lib

  tiny_config.loss.candidate_weight = 2.0
  tiny_config.model.candidate_head = head
  run = run_config(tiny_config)
  tx = optax.sgd(1.0)
  mesh = sharding.make_mesh(1, 1, 1)
  graphdef, _ = transformer.abstract_model(run.model)
  state, _ = state_lib.create_train_state(run.model, tx, mesh, seed=0)
  state = state.replace(params={**state.params, "candidate_head": jax.tree.map(
      lambda p: p + 0.01, state.params["candidate_head"])})  # Non-zero table rows: every piece gets a gradient.
  batch = next(iter(pipeline.train_dataset(run, pipeline.load_source(run, "train"))))
  objective = Objective.from_config(run.loss)
  results = []
  for accum in (1, 4):
    micro = {k: jnp.asarray(v.reshape((accum, -1) + v.shape[1:])) for k, v in batch.items()}
    new_state, out = jax.jit(lambda s, b: step_lib.train_step(s, b, graphdef=graphdef, objective=objective, tx=tx,
                                                              freeze_trunk=False))(state, micro)
    results.append((float(out["loss"]), new_state.params, out))
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  loss, _, out = results[0]
  assert loss == pytest.approx(results[1][0], rel=1e-5)
  for name in ("candidate_value_mse", "candidate_exact_mse", "next_state_exact_mse", "candidate_bayes_value_mse"):
    assert out[name + "/count"] == out["candidate_value_mse/count"] > 0
  value_mse = out["value_mse"] / out["value_mse/count"]  # Discounted target: value_mse is the value loss.
  candidate_mse = out["candidate_value_mse"] / out["candidate_value_mse/count"]
  assert loss == pytest.approx(float(value_mse + 2.0 * candidate_mse), rel=1e-4)


# --- Guided decoding with the candidate head ----------------------------------------------------------------------


@pytest.mark.slow
def test_candidate_head_guidance_scores_from_the_cached_hidden_state():
  """Guided decoding with scorer='candidate_head' (shared trunk, and as the LenVM of a Pair): every recorded value is
  Q(s_t, chosen token) of the cache-free forward's hidden state at s_t; both layouts make the same choices."""
  from lenvm_jax.decoding import candidate_scoring
  from lenvm_jax.decoding.generation import GuidedSampler
  from lenvm_jax.decoding.guided import LengthRequest
  from lenvm_jax.decoding.sampler import SamplingConfig

  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "candidate_head": "table"})
  # Scaled-up weights and a random table: values spread over (-1, 0), choices are no near-ties.
  graphdef, params = tiny_model(64, seed=1, scale=3.0, candidate_head="table")
  params["candidate_head"]["table"] = jax.random.normal(jax.random.key(5), (64, config.hidden_size)) * 0.3
  kind = targets.TargetKind("discounted", 0.9, 1024.0)
  sampling = SamplingConfig(max_new_tokens=12, eos_ids=(1, 2), seed=0, top_p=0.95)
  mesh = sharding.make_mesh(-1, 1, 1)
  prompts = [[5, 6, 7], list(range(9, 17)), [3], [40, 41, 42, 43, 44]] * 2
  requests = [LengthRequest(*r) for r in (("equal_to", 4), ("at_most", 3), ("at_least", 9), ("tilt", 0, -2.0),
                                          ("none",), ("tilt", 0, 3.0), ("equal_to", 8), ("at_least", 2))]
  shared = candidate_scoring.shared_trunk("candidate_head", graphdef, kind, config)
  samples = GuidedSampler(shared, params, sampling, mesh, num_candidates=5, batch_size=8).generate(prompts, requests)
  pair = candidate_scoring.pair("candidate_head", graphdef, graphdef, kind, config)
  paired = GuidedSampler(pair, (params, params), sampling, mesh, num_candidates=5, batch_size=8).generate(
      prompts, requests)

  width = 32
  tokens, segment_ids = np.zeros((2, len(prompts), width), np.int32)
  for row, (prompt, sample) in enumerate(zip(prompts, samples)):
    seq = prompt + sample.completion_ids.tolist()
    tokens[row, :len(seq)], segment_ids[row, :len(seq)] = seq, 1

  @jax.jit
  def every_q(params, tokens, segment_ids):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(tokens, jnp.broadcast_to(jnp.arange(width), tokens.shape), segment_ids)
    return kind.value_estimate(kind.predict(model.candidate_logits(hidden)))  # [B, T, vocab]

  q = np.asarray(every_q(params, jnp.asarray(tokens), jnp.asarray(segment_ids)))
  for row, (prompt, sample, other) in enumerate(zip(prompts, samples, paired)):
    np.testing.assert_array_equal(sample.completion_ids, other.completion_ids)
    np.testing.assert_allclose(sample.values, other.values, atol=1e-5)
    steps = np.arange(len(sample.completion_ids))
    expected = q[row, len(prompt) - 1 + steps, sample.completion_ids]  # Q(s_t, x_{t+1}) read at s_t.
    expected = np.where(np.isin(sample.completion_ids, (1, 2)), 0.0, expected)
    np.testing.assert_allclose(sample.values, expected, atol=2e-5)
  assert len({len(s.completion_ids) for s in samples}) > 1


def test_the_candidate_head_scorer_needs_a_head():
  from lenvm_jax.decoding import candidate_scoring
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64})
  with pytest.raises(ValueError, match="needs a LenVM with a candidate head"):
    candidate_scoring.shared_trunk("candidate_head", None, None, config)
  with pytest.raises(ValueError, match="scorer must be one of"):
    candidate_scoring.lenvm_scorer("k_token", None, None, config)


@pytest.mark.slow
def test_next_values_of_both_scorers_match_the_cache_free_forward():
  """next_values: V(s_t + x) for t = 0 .. L. next_state equals the value head on prefix + [x] run from scratch;
  candidate_head equals Q of the cache-free hidden state at s_t."""
  import types
  from lenvm_jax.decoding import next_values

  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "candidate_head": "tied"})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LengthValueModel(config, nnx.Rngs(0))))
  params = jax.jit(lambda: jax.tree.map(lambda p: p * 3.0 + 0.01, nnx.split(LengthValueModel(config, nnx.Rngs(1)))[1]
                                        .to_pure_dict()))()
  kind = targets.TargetKind("discounted", 0.9, 1024.0)
  predictor = types.SimpleNamespace(config=types.SimpleNamespace(model=config), graphdef=graphdef, kind=kind,
                                    params=params)
  trajectories = [Trajectory(np.asarray(p, np.int32), np.asarray(c, np.int32), True)
                  for p, c in (([5, 6, 7], [9, 10, 1]), ([3], [11, 12, 13, 14, 1]), ([8, 9, 10, 11, 12], [1]))]
  ids = [1, 4, 9, 63]
  got = {scorer: next_values.next_values(predictor, trajectories, ids, scorer, batch_size=2, chunk=3)
         for scorer in ("next_state", "candidate_head")}

  @jax.jit
  def forward(tokens):
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden = model.hidden_states(tokens, positions, jnp.ones_like(tokens))
    q = kind.value_estimate(kind.predict(model.candidate_logits(hidden, jnp.broadcast_to(
        jnp.asarray(ids), tokens.shape + (len(ids),)))))
    return kind.value_estimate(kind.predict(model.value_logits(hidden))), q

  for i, t in enumerate(trajectories):
    sequence = np.concatenate([t.prompt_ids, t.completion_ids])
    p, length = len(t.prompt_ids), len(t.completion_ids)
    assert got["next_state"][i].shape == got["candidate_head"][i].shape == (length + 1, len(ids))
    _, q = forward(jnp.asarray(sequence[None]))
    np.testing.assert_allclose(got["candidate_head"][i], np.asarray(q[0, p - 1:]), atol=2e-5)
    for step in range(length + 1):
      extended = np.stack([np.append(sequence[:p + step], x) for x in ids])  # s_t + x, run from scratch.
      values, _ = forward(jnp.asarray(extended))
      np.testing.assert_allclose(got["next_state"][i][step], np.asarray(values[:, -1]), atol=2e-5)


# --- Hugging Face export / import ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("head", ["table", "tied"])
def test_hf_export_writes_the_head_beside_an_unchanged_reference_layout(tmp_path, head):
  from safetensors import safe_open
  from lenvm_jax.model import hf_export, hf_import, hf_layout

  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "candidate_head": head, "dtype": "float32"})
  params = jax.jit(lambda: jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size, dtype=jnp.float32))
                                        .reshape(p.shape), nnx.split(LengthValueModel(config, nnx.Rngs(1)))[1]
                                        .to_pure_dict()))()  # Non-zero everywhere: a missed tensor shows.
  with_head, without_head = tmp_path / "with", tmp_path / "without"
  written = hf_export.export(params, config, str(with_head))
  assert hf_layout.CANDIDATE_HEAD_FILE in written
  plain_config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "dtype": "float32"})
  hf_export.export({k: v for k, v in params.items() if k != "candidate_head"}, plain_config, str(without_head))

  def names(path):
    with safe_open(str(path), framework="numpy") as f:
      return set(f.keys()), f.metadata()

  for name in ("model.safetensors", hf_layout.VALUE_HEAD_FILE, "config.json"):  # The reference layout, unchanged.
    if name.endswith(".json"):
      assert (with_head / name).read_text() == (without_head / name).read_text()
    else:
      assert names(with_head / name) == names(without_head / name)
  tensors, metadata = names(with_head / hf_layout.CANDIDATE_HEAD_FILE)
  assert metadata["candidate_head"] == head and ("c_head.table.weight" in tensors) == (head == "table")

  mesh = sharding.make_mesh(1, 1, 1)
  loaded_config = hf_import.load_model_config(str(with_head), dtype="float32")
  assert loaded_config == config
  again = hf_import.load_params(str(with_head), loaded_config, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))

  # A directory without the file: no head detected; a model that asks for one gets a fresh head.
  assert hf_import.load_model_config(str(without_head)).candidate_head == "none"
  fresh = hf_import.load_params(str(without_head), config, mesh)["candidate_head"]
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params["candidate_head"])
  # A re-export without the head removes the old file, so it is never read back by mistake.
  hf_export.export({k: v for k, v in params.items() if k != "candidate_head"}, plain_config, str(with_head))
  assert not (with_head / hf_layout.CANDIDATE_HEAD_FILE).exists()


# --- Quality against the synthetic policy's exact values ------------------------------------------------------------


def test_exact_next_state_values_agree_with_the_exact_values_and_the_jax_scorer():
  from lenvm_jax.data.synthetic import SyntheticPolicy
  from lenvm_jax.decoding.synthetic_models import SyntheticScorer
  policy = SyntheticPolicy()
  scorer = SyntheticScorer(policy, GAMMA)
  for i in range(20):
    t = policy.sample(np.random.default_rng([3, i]))
    table = policy.next_state_values(t, GAMMA)
    exact = policy.exact_values(t, GAMMA)
    assert table.shape == (len(t.completion_ids) + 1, policy.vocab_size)
    np.testing.assert_allclose(table[np.arange(len(t.completion_ids)), t.completion_ids], exact[1:], atol=1e-6)
    modes = scorer.start(None, jnp.asarray(t.prompt_ids[None]), None, None)
    logits, _ = scorer.score(None, modes, jnp.arange(policy.vocab_size)[None], None)  # z of V = -sigmoid(z).
    np.testing.assert_allclose(table[0], -np.asarray(jax.nn.sigmoid(logits[0])), atol=1e-6)


def test_scorer_errors_count_non_terminal_states_per_token_class():
  from lenvm_jax.data.synthetic import SyntheticPolicy
  from lenvm_jax.evaluation import candidate_quality
  policy = SyntheticPolicy(vocab_size=16)
  classes = candidate_quality.token_classes(policy)
  assert sum(classes[c].sum() for c in ("eos", "switch", "filler", "never_emitted")) == 16
  exact = [np.zeros((4, 16)), np.zeros((3, 16))]
  values = [np.zeros((4, 16)), np.zeros((3, 16))]
  values[0][:, 1] = 0.5  # EOS column off by 0.5 at every state of trajectory 0 (3 non-terminal states).
  values[0][3] = 9.0  # The terminal state s_3: never counted.
  values[1][2] = 1.0  # Trajectory 1 was cut: all 3 states are non-terminal (its full length is 5).
  out = candidate_quality.scorer_errors(values, exact, [3, 5], [np.asarray([10, 11, 1]), np.asarray([1, 12])],
                                        classes)
  assert out["eos"] == pytest.approx((3 * 0.25 + 1.0) / 6)
  assert out["all"] == pytest.approx((3 * 0.25 + 16.0) / (6 * 16))
  assert out["filler"] == pytest.approx(classes["filler"].sum() / (6 * classes["filler"].sum()))
  # Realised next tokens: 10, 11, 1 (EOS: 0.25) in trajectory 0; 1, 12 in trajectory 1 (states 0, 1).
  assert out["realised"] == pytest.approx(0.25 / 5)


def test_token_ids_flag_is_parsed_and_checked():
  from lenvm_jax.decoding import next_values
  assert next_values.parse_token_ids("all", 64) is None
  assert next_values.parse_token_ids("1, 6,9", 64) == [1, 6, 9]
  for bad, message in (("1,x", "comma-separated"), ("1,64", r"\[0, 64\)"), ("", r"\[0, 64\)")):
    with pytest.raises(ValueError, match=message):
      next_values.parse_token_ids(bad, 64)
  with pytest.raises(ValueError, match="more than 4096"):
    next_values.parse_token_ids("all", 151936)


# --- A run: training, checkpoints, prediction CLI ------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_the_head_checkpoints_resumes_and_predicts_next_values(tiny_config, tmp_path):
  """The head trains, is checkpointed and restored with the rest (a resumed run continues from it; the Predictor
  serves it), and `predict --mode=next_values` writes V(s_t + x) for every state with both scorers."""
  import json
  import subprocess
  import sys
  from lenvm_jax.decoding.predict import Predictor
  from lenvm_jax.train import trainer
  from tests.helpers import REPO

  tiny_config.model.candidate_head = "table"
  tiny_config.loss.candidate_weight = 1.0
  tiny_config.mesh.data = 1
  tiny_config.train.steps = 10
  workdir = tmp_path / "run"
  first = trainer.train_and_evaluate(run_config(tiny_config), str(workdir))
  assert "candidate_value_mse" in first and "candidate_exact_mse" in first
  at_10 = Predictor(str(workdir)).params["candidate_head"]
  assert float(jnp.abs(at_10["table"]).max()) > 0  # Trained away from its zero init.
  tiny_config.train.steps = 15  # Resumes from step 10, head included.
  trainer.train_and_evaluate(run_config(tiny_config), str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"][-6:] == [10, 11, 12, 13, 14, 15]
  resumed = Predictor(str(workdir))
  assert resumed.step == 15
  assert not np.allclose(resumed.params["candidate_head"]["table"], at_10["table"])

  inputs = tmp_path / "in.jsonl"
  trajectories = [Trajectory(np.asarray([7, 2, 9], np.int32), np.asarray([12, 13, 1], np.int32), True),
                  Trajectory(np.asarray([3, 8], np.int32), np.asarray([20], np.int32), False)]
  inputs.write_text("".join(json.dumps({"prompt_ids": t.prompt_ids.tolist(), "completion_ids":
                                        t.completion_ids.tolist(), "finished": t.finished}) + "\n"
                            for t in trajectories))
  out = {}
  for scorer in ("next_state", "candidate_head"):
    path = tmp_path / f"{scorer}.jsonl"
    subprocess.run([sys.executable, "-m", "experiments.predict", "--mode=next_values", f"--scorer={scorer}",
                    "--token_ids=all", "--workdir", str(workdir), "--input", str(inputs), "--output", str(path)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    out[scorer] = [json.loads(line) for line in path.read_text().splitlines()]
  for scorer, lines in out.items():
    for t, line in zip(trajectories, lines):
      values = np.asarray(line["values"])
      assert line["token_ids"] == list(range(64)) and values.shape == (len(t.completion_ids) + 1, 64), scorer
      assert ((values > -1) & (values <= 0)).all()
