"""One place that writes metrics: stdout (absl logging), `<workdir>/metrics.jsonl` and TensorBoard events.

In a multi-host run every host logs to its own stdout, but only process 0 writes the files (values are global).
"""

import json
import os

import tensorboardX
from absl import logging

from lenvm_jax import distributed


def _drop_torn_line(path: str):
  """A run killed (or out of disk) mid-write can leave a last line without its newline: cut it, so the records a
  resumed run appends stay one JSON object per line."""
  if not os.path.isfile(path):
    return
  with open(path, "rb+") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if not size:
      return
    f.seek(max(size - (1 << 16), 0))
    tail = f.read()
    if tail.endswith(b"\n"):
      return
    cut = tail.rfind(b"\n")
    if cut >= 0 or len(tail) == size:
      f.truncate(size - len(tail) + cut + 1)


class MetricsLog:

  def __init__(self, workdir: str):
    self._jsonl = self._tb = None
    if distributed.is_leader():
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_torn_line(path)
      self._jsonl = open(path, "a", encoding="utf-8")
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
