"""TensorBoard event files: our scalar records are byte-for-byte what tensorboardX writes (test-only dependency)."""

import json
import pathlib
import struct

import pytest

from lenvm_jax.train import metrics_log


def _records(path) -> list[bytes]:
  """Whole TFRecords (length, its CRC, payload, its CRC) of an event file."""
  data, records, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    records.append(data[at:at + 16 + length])
    at += 16 + length
  assert at == len(data)
  return records


def test_scalar_events_match_tensorboardx(tmp_path):
  tensorboardX = pytest.importorskip("tensorboardX")
  from tensorboardX.proto import event_pb2
  scalars = [("train/loss", 0.123456789, 1), ("eval/length_mae", 1e6 + 0.5, 20), ("train/grad_norm", -3.0, 2**40)]
  ours = metrics_log.ScalarEventFile(str(tmp_path / "ours"))
  for tag, value, step in scalars:
    ours.add_scalar(tag, value, step, wall_time=1700000000.25)
  ours.add_scalar("train/loss", 2.5, 3)
  ours.close()
  writer = tensorboardX.SummaryWriter(str(tmp_path / "theirs"))
  for tag, value, step in scalars:
    writer.add_scalar(tag, value, step, walltime=1700000000.25)
  writer.close()
  (theirs_file,) = (tmp_path / "theirs").iterdir()
  ours_records, theirs_records = _records(pathlib.Path(ours.path)), _records(theirs_file)
  assert ours_records[1:4] == theirs_records[1:4]  # Framing, checksums and Event bytes alike.
  header, last = event_pb2.Event(), event_pb2.Event()
  header.ParseFromString(ours_records[0][12:-4])
  assert header.file_version == "brain.Event:2"
  last.ParseFromString(ours_records[4][12:-4])
  assert (last.step, last.summary.value[0].tag, last.summary.value[0].simple_value) == (3, "train/loss", 2.5)
  assert last.wall_time > 1700000000


def test_metrics_log_writes_jsonl_and_events(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path))
  log.write(1, "train", {"loss": 0.5, "grad_norm": 2.0})
  log.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "split": "train", "loss": 0.5,
                                                                   "grad_norm": 2.0}
  (events,) = (tmp_path / "tensorboard").iterdir()
  assert len(_records(events)) == 3  # Header and two scalars.
