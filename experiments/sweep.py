"""Run a hyperparameter sweep locally: one trainer run per point, each in its own workdir under --sweep_dir.

  python -m experiments.sweep --config experiments/configs/synthetic.py --sweep_dir runs/sweep \
      --sweep config.loss.gamma=0.99,0.997 --sweep config.optim.lr=1e-3,3e-4 [--zip] [--parallel 2]

Points are the product of the --sweep axes (or, with --zip, their i-th values together); a --sweep with one value
is a fixed override for every point. Rerunning the same command resumes: finished points are skipped and unfinished
ones continue from their checkpoints. Ctrl-C (or SIGTERM) stops the running points at a checkpoint. At the end,
`<sweep_dir>/summary.csv` holds every point's final train and eval metrics, and a table of them is printed.
"""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

from absl import app, flags

from experiments import cli
from lenvm_jax import files, sweep_spec
from lenvm_jax.run.workdir_checks import is_url

_CONFIG = flags.DEFINE_string("config", None, "Trainer config file (experiments/configs/*.py).")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep: one workdir per point + summary.csv.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "config.<field>=<v1>,<v2>,... (repeat for more axes).")
_ZIP = flags.DEFINE_bool("zip", False, "Pair the axes' values in order instead of taking their product.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at the same time.")
_TABLE = flags.DEFINE_list("table", ["train/loss", "eval/loss", "eval/length_mae"],
                           "Metrics shown in the printed table (summary.csv has all of them).")
flags.mark_flags_as_required(["config", "sweep_dir"])

DONE = "SWEEP_POINT_DONE"  # Written into a point's workdir when its trainer exits 0.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_metrics(workdir: str) -> dict:
  """The last train and eval record of a run's metrics.jsonl, as {"step", "train/<m>", "eval/<m>"}."""
  path = os.path.join(workdir, "metrics.jsonl")
  out: dict = {}
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      split, step = record.pop("split"), record.pop("step")
      out["step"] = max(out.get("step", 0), step)
      out.update({f"{split}/{k}": v for k, v in record.items()})
  return out


class _Runner:
  """Starts trainer processes, at most `parallel` at a time; a stop request forwards SIGTERM to all of them."""

  def __init__(self, config: str, parallel: int, env: dict):
    self.config = config
    self.env = env
    self.parallel = parallel
    self.stopping = False
    self.running: dict[str, tuple[subprocess.Popen, object]] = {}
    self.status: dict[str, str] = {}

  def request_stop(self, signum, frame):
    del frame
    if not self.stopping:
      print(f"sweep: {signal.Signals(signum).name}: stopping running points at a checkpoint", file=sys.stderr)
    self.stopping = True
    for proc, _ in self.running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  def _start(self, name: str, point: dict, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "train.log"), "a", encoding="utf-8")
    command = [sys.executable, "-m", "experiments.train", f"--config={self.config}", f"--workdir={workdir}"]
    command += sweep_spec.trainer_flags(point)
    print(f"sweep: start {name}: {' '.join(command[1:])}", flush=True)
    self.running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                            env=self.env), log)

  def _reap(self, sweep_dir: str):
    for name, (proc, log) in list(self.running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del self.running[name]
      if proc.returncode == 0 and not self.stopping:
        files.write_atomic(os.path.join(sweep_dir, name, DONE), "")
        self.status[name] = "done"
      else:
        self.status[name] = "stopped" if self.stopping else f"failed (exit {proc.returncode})"
      print(f"sweep: {name}: {self.status[name]} (log: {os.path.join(sweep_dir, name, 'train.log')})", flush=True)

  def run(self, named_points, sweep_dir: str):
    pending = []
    for name, point in named_points:
      if os.path.exists(os.path.join(sweep_dir, name, DONE)):
        self.status[name] = "done"
      else:
        pending.append((name, point))
    print(f"sweep: {len(named_points)} points, {len(named_points) - len(pending)} already done", flush=True)
    while (pending and not self.stopping) or self.running:
      while pending and not self.stopping and len(self.running) < self.parallel:
        name, point = pending.pop(0)
        self._start(name, point, os.path.join(sweep_dir, name))
      time.sleep(0.2)
      self._reap(sweep_dir)
    for name, _ in pending:
      self.status[name] = "not started"


def write_summary(named_points, status: dict, sweep_dir: str, shown: list[str]) -> list[dict]:
  """summary.csv (every final metric of every point) and the printed table (the `shown` metrics)."""
  rows = []
  for name, point in named_points:
    row = {"point": name, "status": status.get(name, "not started"), **point}
    row.update(final_metrics(os.path.join(sweep_dir, name)))
    rows.append(row)
  columns: list[str] = []
  for row in rows:
    columns += [c for c in row if c not in columns]
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(os.path.join(sweep_dir, "summary.csv"), table.getvalue())  # Never through a planted link.

  table_columns = ["point", "status", "step"] + [m for m in shown if any(m in r for r in rows)]
  cells = [[_cell(r.get(c, "")) for c in table_columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(table_columns)]
  for row in [table_columns] + cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
  print(f"sweep: summary written to {os.path.join(sweep_dir, 'summary.csv')}")
  return rows


def _cell(value) -> str:
  return f"{value:.5g}" if isinstance(value, float) else str(value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not os.path.isfile(_CONFIG.value):
    raise app.UsageError(f"--config {_CONFIG.value}: no such file")
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel must be >= 1, got {_PARALLEL.value}")
  try:
    named = sweep_spec.named_points(_SWEEP.value, _ZIP.value)
  except sweep_spec.SweepError as e:
    raise app.UsageError(str(e)) from None
  if is_url(_SWEEP_DIR.value):  # Points run here and write with local file I/O (as the trainer checks too).
    raise app.UsageError(f"--sweep_dir {_SWEEP_DIR.value!r} is a URL: sweeps run locally; pass a local path")
  sweep_dir = os.path.abspath(_SWEEP_DIR.value)
  os.makedirs(sweep_dir, exist_ok=True)
  # Points share a persistent compilation cache: a resumed point (or one whose programs match another's) skips
  # most of its compile time.
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(sweep_dir, ".jax_cache"))
  runner = _Runner(os.path.abspath(_CONFIG.value), _PARALLEL.value, env)
  previous = {s: signal.signal(s, runner.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    runner.run(named, sweep_dir)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  write_summary(named, runner.status, sweep_dir, _TABLE.value)
  if any(s != "done" for s in runner.status.values()):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
