"""One place that writes metrics: stdout (absl logging), `<workdir>/metrics.jsonl` and TensorBoard events.

In a multi-host run every host logs to its own stdout, but only process 0 writes the files (values are global).
TensorBoard files are written here, not by tensorboardX: its import loads torch whenever torch is installed (1.5 s
on every trainer start), for a format that is a few lines for scalars.
"""

import errno
import json
import os
import socket
import stat
import struct
import time

from absl import logging

from lenvm_jax import distributed
from lenvm_jax.errors import UserError


def _open_own_file(path: str) -> int:
  """A file descriptor to append to `path`, a regular file of the run's own (created if missing). The open follows no
  symlink (O_NOFOLLOW): a link planted in the workdir would make every step append to (or the torn-line repair
  truncate) a file outside it; a FIFO or device would hang or swallow the log. Either is refused, naming the path."""
  flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
  try:
    fd = os.open(path, flags, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError.at("a symbolic link where the run writes its own log", path,
                         "remove the link: a run writes its metrics into its workdir, never through a link") from None
    if e.errno == errno.ENXIO:
      raise UserError.at("not a regular file where the run writes its own log", path, "remove it") from None
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise UserError.at("not a regular file where the run writes its own log", path, "remove it")
  os.set_blocking(fd, True)
  return fd


def _drop_torn_line(fd: int):
  """A run killed (or out of disk) mid-write can leave a last line without its newline: cut it, so the records a
  resumed run appends stay one JSON object per line."""
  size = os.fstat(fd).st_size
  if not size:
    return
  start = max(size - (1 << 16), 0)
  tail = os.pread(fd, size - start, start)
  if tail.endswith(b"\n"):
    return
  cut = tail.rfind(b"\n")
  if cut >= 0 or len(tail) == size:
    os.ftruncate(fd, size - len(tail) + cut + 1)


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected.
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of CRCs does not look valid."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _scalar_event(wall_time: float, step: int, tag: str, value: float) -> bytes:
  """The bytes of a tensorflow.Event holding Summary{value: [{tag, simple_value}]}."""
  summary_value = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
  return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _field(5, _field(1, summary_value))


class ScalarEventFile:
  """A TensorBoard event file of scalars: TFRecords (length, masked CRCs) of serialized tensorflow.Event protos."""

  def __init__(self, logdir: str):
    if os.path.islink(logdir):  # Events would land wherever the link points.
      raise UserError.at("a symbolic link where the run writes its TensorBoard events", logdir,
                         "remove the link: a run writes its events into its workdir only")
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}")
    self._file = os.fdopen(_open_own_file(self.path), "ab")
    self._record(b"\x09" + struct.pack("<d", now) + _field(3, b"brain.Event:2"))  # The file-version header.

  def _record(self, event: bytes):
    length = struct.pack("<Q", len(event))
    self._file.write(length + struct.pack("<I", _masked_crc32c(length)) + event +
                     struct.pack("<I", _masked_crc32c(event)))

  def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None):
    self._record(_scalar_event(time.time() if wall_time is None else wall_time, step, tag, value))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def check_workdir_files(workdir: str) -> None:
  """At a run's start, before any work: the log files the run appends to are its own (no link, no FIFO / device)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
    os.close(_open_own_file(path))  # Raises, naming the path.
  if os.path.islink(os.path.join(workdir, "tensorboard")):
    raise UserError.at("a symbolic link where the run writes its TensorBoard events",
                       os.path.join(workdir, "tensorboard"), "remove the link: a run writes its events into its "
                       "workdir only")


class MetricsLog:

  def __init__(self, workdir: str):
    self._jsonl = self._tb = None
    if distributed.is_leader():
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      fd = _open_own_file(path)
      try:
        _drop_torn_line(fd)
      except BaseException:
        os.close(fd)
        raise
      self._jsonl = os.fdopen(fd, "a", encoding="utf-8")
      self._tb = ScalarEventFile(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: dict):
    if self._jsonl is not None:
      record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
      self._tb.flush()
    shown = " ".join(f"{k}={float(v):.5g}" for k, v in values.items())
    # The console shows train progress as one line (lenvm_jax/progress.py); the whole train record with --verbosity=1.
    logging.log(logging.DEBUG if split == "train" else logging.INFO, "[%s] step %d %s", split, step, shown)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
