import numpy as np
import pytest

from lenvm_jax.evaluation import length_scores, length_tokens


def test_lifebench_scores_by_hand():
  # d = -0.5, 0, +0.5, +1 against a 100-token target.
  outputs, targets = [50, 100, 150, 200], [100] * 4
  np.testing.assert_allclose(length_scores.length_deviation(outputs, targets), [-0.5, 0.0, 0.5, 1.0])
  equal = [100 * np.exp(-2.5), 100.0, 100 * np.exp(-1.0), 100 * np.exp(-2.0)]
  np.testing.assert_allclose(length_scores.length_score(outputs, targets, "equal_to"), equal)
  np.testing.assert_allclose(length_scores.length_score(outputs, targets, "at_most"), [100, 100, equal[2], equal[3]])
  np.testing.assert_allclose(length_scores.length_score(outputs, targets, "at_least"), [equal[0], 100, 100, 100])
  summary = length_scores.summarize(outputs, targets, "equal_to")
  assert summary["score"] == pytest.approx(np.mean(equal))
  assert summary["deviation"] == pytest.approx(0.25) and summary["abs_deviation"] == pytest.approx(0.5)
  # Falling short costs more than overshooting by the same fraction; huge overshoots do not overflow.
  assert length_scores.length_score([80], [100], "equal_to")[0] < length_scores.length_score([120], [100],
                                                                                                "equal_to")[0]
  assert length_scores.length_score([10**9], [1], "equal_to")[0] == 0.0


def test_lifebench_rejects_bad_input():
  with pytest.raises(ValueError, match="equal_to"):
    length_scores.length_score([1], [1], "exactly")
  with pytest.raises(ValueError, match="positive"):
    length_scores.length_score([1], [0], "equal_to")


def test_length_tokens_from_a_hand_built_value_sequence():
  gamma = 0.9
  r = -(1 - gamma)
  # A self-consistent stretch (V_t = (V_{t-1} - r) / gamma) except: token 7 jumps to a longer continuation
  # (more negative V), token 8 to a shorter one.
  v = [-0.5]
  for token in (3, 3, 7, 3, 8, 3):
    consistent = (v[-1] - r) / gamma
    v.append({7: consistent - 0.2, 8: consistent + 0.1}.get(token, consistent))
  residuals = length_tokens.td_residuals(v, gamma)
  np.testing.assert_allclose(residuals, [0, 0, -0.18, 0, 0.09, 0], atol=1e-12)
  report = length_tokens.length_tokens([([3, 3, 7, 3, 8, 3], v), ([7], [-0.5, -0.9])], gamma)
  assert [(e["token"], e["count"], e["occurrences"]) for e in report["lengthening"]] == [(7, 2, 2)]
  assert [(e["token"], e["count"], e["occurrences"]) for e in report["shortening"]] == [(8, 1, 1)]
  assert report["occurrences"] == 7 and report["marked"] == 3
  with pytest.raises(ValueError, match="values"):
    length_tokens.length_tokens([([3, 3], [0.0, 0.0])], gamma)
