"""One place that writes metrics: stdout (absl logging), `<workdir>/metrics.jsonl` and TensorBoard events.

In a multi-host run every host logs to its own stdout, but only process 0 writes the files (values are global).
"""

import json
import os

import tensorboardX
from absl import logging

from lenvm_jax import distributed


class MetricsLog:

  def __init__(self, workdir: str):
    self._jsonl = self._tb = None
    if distributed.is_leader():
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: dict):
    if self._jsonl is not None:
      record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    shown = " ".join(f"{k}={float(v):.5g}" for k, v in values.items())
    logging.info("[%s] step %d %s", split, step, shown)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
