import jax.numpy as jnp
import numpy as np
import pytest

from lenvm_jax.value import targets


def test_discounted_return_exact_values_and_inverse():
  gamma = 0.997
  n = jnp.array([0, 1, 2, 10, 500, -1])
  g = np.asarray(targets.discounted_return(n, gamma))
  expected = [0.0, -(1 - gamma), -(1 - gamma**2), -(1 - gamma**10), -(1 - gamma**500), -1.0]
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
  back = np.asarray(targets.remaining_from_value(jnp.asarray(g[:5]), gamma))
  np.testing.assert_allclose(back, [0, 1, 2, 10, 500], rtol=1e-3, atol=2e-2)


def test_bellman_recursion_holds():
  gamma = 0.98
  n = jnp.arange(1, 200)
  g = targets.discounted_return(n, gamma)
  g_next = targets.discounted_return(n - 1, gamma)
  np.testing.assert_allclose(g, -(1 - gamma) + gamma * g_next, atol=1e-6)


def _packed_row():
  # Two sequences in one row plus padding: seq A has value positions 1..4 (EOS at 4); seq B is cut at max_len
  # and keeps its true remaining lengths (7, 6, 5).
  remaining = jnp.array([[0, 3, 2, 1, 0, 0, 7, 6, 5, 0]])
  value_mask = jnp.array([[0, 1, 1, 1, 1, 0, 1, 1, 1, 0]], bool)
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
  return remaining, value_mask, segment_ids


def test_gae_lambda_one_is_monte_carlo():
  remaining, value_mask, segment_ids = _packed_row()
  values = jnp.linspace(-0.9, -0.1, 10)[None]  # Arbitrary: lambda = 1 must ignore them.
  gae = targets.gae_targets(values, remaining, value_mask, segment_ids, 0.9, 1.0)
  mc = targets.discounted_return(remaining, 0.9)
  np.testing.assert_allclose(np.asarray(gae)[value_mask], np.asarray(mc)[value_mask], atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95])
def test_gae_matches_a_plain_python_recursion(lam):
  gamma = 0.9
  remaining, value_mask, segment_ids = _packed_row()
  values = np.linspace(-0.9, -0.1, 10)
  gae = np.asarray(targets.gae_targets(jnp.asarray(values)[None], remaining, value_mask, segment_ids, gamma, lam))[0]
  r = -(1 - gamma)
  mc = lambda n: -(1 - gamma**n)
  # Sequence A (positions 1..4, EOS at 4 whose value is 0 by definition).
  a = {4: 0.0}
  for t in (3, 2, 1):
    v_next = 0.0 if t + 1 == 4 else values[t + 1]
    a[t] = r + gamma * ((1 - lam) * v_next + lam * a[t + 1])
  # Sequence B (positions 6..8), cut: the last present position takes its Monte-Carlo return.
  b = {8: mc(5)}
  for t in (7, 6):
    b[t] = r + gamma * ((1 - lam) * values[t + 1] + lam * b[t + 1])
  for t, want in {**a, **b}.items():
    assert gae[t] == pytest.approx(want, abs=1e-6), t


def test_huber_loss_is_half_squared_within_delta_and_linear_beyond():
  kind = targets.TargetKind("raw_length", 0.99, 1.0, loss="huber", huber_delta=1.0)
  prediction, target = jnp.array([0.0, 0.5, 3.0, -10.0]), jnp.zeros(4)
  np.testing.assert_allclose(kind.regression_loss(prediction, target), [0.0, 0.125, 2.5, 9.5])
  wide = targets.TargetKind("discounted", 0.99, 1.0, loss="huber", huber_delta=2.0)
  np.testing.assert_allclose(wide.regression_loss(jnp.array([1.0, 3.0]), jnp.zeros(2)), [0.5, 4.0])
  mse = targets.TargetKind("discounted", 0.99, 1.0)
  np.testing.assert_allclose(mse.regression_loss(prediction, target), [0.0, 0.25, 9.0, 100.0])
  with pytest.raises(ValueError, match="loss.kind"):
    targets.TargetKind("discounted", 0.99, 1.0, loss="l1")
  from lenvm_jax.config import LossConfig  # pylint: disable=g-import-not-at-top
  from lenvm_jax.value.objective import Objective  # pylint: disable=g-import-not-at-top
  kind = Objective.from_config(LossConfig(gamma=0.9, kind="huber", huber_delta=2.0)).kind
  assert (kind.loss, kind.huber_delta) == ("huber", 2.0)


def test_normalized_length_divides_by_the_normalizer_without_clipping():
  kind = targets.TargetKind("normalized_length", 0.99, 100.0)
  np.testing.assert_allclose(kind.target(jnp.array([0, 50, 100, 250])), [0.0, 0.5, 1.0, 2.5])
  with pytest.raises(ValueError, match="length_normalizer"):
    targets.TargetKind("normalized_length", 0.99, 0.0)


def test_normalized_length_with_the_reference_constant_and_softplus_reaches_lengths_past_the_normalizer():
  """The reference's length target: n / c for a constant c the user sets (default 1), read through softplus; the
  sigmoid link tops out at n_hat = c, so under it a constant shorter than the lengths cannot be fit."""
  z = jnp.array([-3.0, 0.0, 2.0, 40.0])
  reference = targets.TargetKind("normalized_length", 0.99, 1.0, length_activation="softplus")
  np.testing.assert_allclose(reference.predict(z), np.log1p(np.exp(np.asarray(z, np.float64))), rtol=1e-6)
  np.testing.assert_allclose(reference.target(jnp.array([0, 7, 400])), [0.0, 7.0, 400.0])
  n = jnp.array([0, 3, 40, 400])
  np.testing.assert_allclose(reference.remaining_estimate(reference.target(n)), [0, 3, 40, 400])
  np.testing.assert_allclose(reference.remaining_estimate(reference.predict(jnp.array([40.0]))), [40.0], rtol=1e-6)
  ours = targets.TargetKind("normalized_length", 0.99, 100.0)
  assert float(ours.remaining_estimate(ours.predict(jnp.array(40.0)))) == pytest.approx(100.0)
  # The per-token loss against the target: (softplus(z) - n / c) ** 2 with c = 4.
  kind = targets.TargetKind("normalized_length", 0.99, 4.0, length_activation="softplus")
  loss = kind.regression_loss(kind.predict(jnp.array([0.0, 1.0])), kind.target(jnp.array([2, 12])))
  expected = (np.log1p(np.exp([0.0, 1.0])) - np.array([0.5, 3.0])) ** 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="length_activation"):
    targets.TargetKind("normalized_length", 0.99, 1.0, length_activation="relu")


def test_loss_config_carries_the_length_activation_to_the_objective():
  from lenvm_jax.config import ConfigError, LossConfig  # pylint: disable=g-import-not-at-top
  from lenvm_jax.value.objective import Objective  # pylint: disable=g-import-not-at-top
  loss = LossConfig(gamma=0.9, target_type="normalized_length", length_normalizer=1.0, length_activation="softplus")
  kind = Objective.from_config(loss).kind
  assert (kind.length_normalizer, kind.length_activation) == (1.0, "softplus")
  assert Objective.from_config(LossConfig(gamma=0.9)).kind.length_activation == "sigmoid"
  with pytest.raises(ConfigError, match=r"config\.loss\.length_activation: must be one of"):
    LossConfig(length_activation="relu")


def test_ablation_target_kinds_round_trip_lengths():
  n = jnp.array([0, 3, 40, 400])
  for name in targets.TARGET_TYPES:
    kind = targets.TargetKind(name, gamma=0.99, length_normalizer=1000.0)
    estimate = kind.remaining_estimate(kind.target(n))
    np.testing.assert_allclose(np.asarray(estimate), np.asarray(n, np.float32), rtol=2e-3, atol=2e-3, err_msg=name)
  with pytest.raises(ValueError, match="target_type"):
    targets.TargetKind("softmax", 0.99, 1.0)
