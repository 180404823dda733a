"""Prompt-boundary prediction: the report (the prompt reader is tested in test_prompts.py, the CLI modes in
test_end_to_end.py)."""

import numpy as np
import pytest

from lenvm_jax.data.records import Trajectory
from lenvm_jax.evaluation import length_eval
from lenvm_jax.value import targets


def _t(prompt, length, prompt_id=None, generator="g"):
  return Trajectory(np.asarray(prompt, np.int32), np.full(length, 12, np.int32), True, prompt_id, generator)


class _FixedPredictor:
  """L_hat = 10 * (first prompt token)."""

  def predict_prompts(self, prompts, batch_size, max_prompt_len):
    lengths = np.asarray([10.0 * t.prompt_ids[0] for t in prompts])
    return -(1 - 0.9**lengths), lengths


def test_prompt_boundary_report_groups_by_prompt_and_generator():
  samples = [_t([2], 10), _t([2], 30), _t([3], 20, generator="h"), _t([3], 30, "q", "h")]
  report = length_eval.prompt_boundary_report(_FixedPredictor(), samples, gamma=0.9)
  truth = targets.prompt_boundary_length([10, 30], 0.9)
  # Groups: prompt (2,) / g with L_hat 20; prompt (3,) / h (L_GT 20, L_hat 30); prompt id q / h (30 vs 30).
  assert report["mre"]["g"] == pytest.approx(abs(20 - truth) / truth)
  assert report["mre"]["h"] == pytest.approx((10 / 20 + 0) / 2)
  assert report["mre"]["*"] == pytest.approx((abs(20 - truth) / truth + 0.5) / 3)
  assert [(g["prompt"], g["samples"]) for g in report["groups"]] == [([2], 2), ([3], 1), ("q", 1)]

