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


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
  log = metrics_log.MetricsLog(str(tmp_path))
  log.write(3, "train", {"loss": 1.0})
  log.close()
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 3]


@pytest.mark.parametrize("planted", ["metrics.jsonl", "tensorboard"])
def test_logs_never_write_through_a_link_planted_in_the_workdir(tmp_path, planted):
  """A link at metrics.jsonl (or the tensorboard folder) pointing outside the workdir: the run refuses it at start,
  naming it, and the file outside is neither appended to nor truncated by the torn-line repair."""
  from lenvm_jax.errors import UserError
  outside = tmp_path / "outside"
  outside.mkdir()
  victim = outside / "victim.txt"
  victim.write_text("precious, no newline at the end")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / planted).symlink_to(victim if planted == "metrics.jsonl" else outside)
  with pytest.raises(UserError, match=f"a symbolic link where the run writes its .*{planted}"):
    metrics_log.check_workdir_files(str(workdir))
  with pytest.raises(UserError, match=f"symbolic link .*{planted}"):
    metrics_log.MetricsLog(str(workdir))
  assert victim.read_text() == "precious, no newline at the end"
  assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_a_fifo_for_the_log_is_refused_not_waited_on(tmp_path):
  import os
  from lenvm_jax.errors import UserError
  os.mkfifo(tmp_path / "metrics.jsonl")
  with pytest.raises(UserError, match="not a regular file .*metrics.jsonl"):
    metrics_log.check_workdir_files(str(tmp_path))
  with pytest.raises(UserError, match="not a regular file .*metrics.jsonl"):
    metrics_log.MetricsLog(str(tmp_path))
