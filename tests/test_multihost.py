"""Two local processes (jax.distributed over localhost) train on one mesh and match a single-process run."""

import functools
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import FAST_COMPILE_XLA_FLAGS, REPO, run_config

# Unpacked rows: the two hosts' slices then form exactly the rows of the single-process global batch (in another
# order, which sums do not see). 65 eval records: hosts hold 33 and 32, i.e. 5 and 4 eval batches of 8 rows, so the
# run only finishes if hosts with fewer eval batches keep stepping (distributed.aligned_batches).
OVERRIDES = {"train.steps": 4, "train.eval_every": 2, "checkpoint.every_steps": 2, "data.packing": "none",
             "data.synthetic.eval_records": 65}
DEVICES_PER_PROCESS = 2


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_XLA_FLAGS}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _check(proc: subprocess.Popen, name: str):
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, f"{name} failed:\n{out[-4000:]}"


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tiny_config):
  train = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py"] + [
      f"--config.{name}={value}" for name, value in OVERRIDES.items()]
  port = _free_port()
  hosts = [subprocess.Popen(train + [f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=localhost:{port}",
                                     "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=_env(DEVICES_PER_PROCESS), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  # The single process is this one (no third interpreter and jax start), meanwhile, on 4 of its 8 devices: the
  # hosts' global mesh.
  from lenvm_jax.train import trainer
  for name, value in {**OVERRIDES, "mesh.data": 2 * DEVICES_PER_PROCESS}.items():
    *sections, field = name.split(".")
    functools.reduce(getattr, sections, tiny_config)[field] = value
  try:
    trainer.train_and_evaluate(run_config(tiny_config), str(tmp_path / "single"))
  finally:
    for i, proc in enumerate(hosts):
      _check(proc, f"process {i}")

  multi, ref = _records(tmp_path / "multi"), _records(tmp_path / "single")
  # Process 0 alone writes metrics: one record per step and split, not one per host.
  assert [(r["step"], r["split"]) for r in multi] == [(r["step"], r["split"]) for r in ref]
  # Before step 1 the trainer records what was cut or dropped per split (data_train / data_eval), once.
  assert [(r["step"], r["split"]) for r in ref if r["split"] in ("train", "eval")] == [(1, "train"), (2, "train"),
                                                                                       (2, "eval"), (3, "train"),
                                                                                       (4, "train"), (4, "eval")]
  for got, want in zip(multi, ref):
    for key in want:
      if key in ("tokens_per_s", "flops_per_s", "step", "split"):
        continue
      assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-6), (got["step"], got["split"], key)
  # Eval saw all 65 records on both runs (a host that stopped early would drop its share from the sums).
  assert multi[-1]["length_mae"] == pytest.approx(ref[-1]["length_mae"], rel=2e-5)
  # Checkpoints come from both hosts: orbax commits each step once, and grain saves one iterator state per process.
  steps = sorted(int(d) for d in os.listdir(tmp_path / "multi" / "checkpoints") if d.isdigit())
  assert steps == [2, 4]
  iterator_files = sorted(os.listdir(tmp_path / "multi" / "checkpoints" / "4" / "data_iter"))
  assert [f for f in iterator_files if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_initialize_decides_when_to_start(monkeypatch):
  from lenvm_jax import distributed
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  for variable in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(variable, raising=False)
  assert distributed._cluster_detected() is None  # pylint: disable=protected-access
  assert distributed.initialize("auto") is False  # A plain single-process run starts nothing.
  assert distributed.initialize("off", "localhost:1", 2, 0) is False
  with pytest.raises(ValueError, match="--num_processes and --process_id"):
    distributed.initialize("auto", "localhost:1", None, 0)
  with pytest.raises(ValueError, match="--distributed must be one of"):
    distributed.initialize("yes")
  # Single process: the pass ends with this host's batches, and no collective is needed.
  assert list(distributed.aligned_batches([{"x": 1}, {"x": 2}], {"x": 0})) == [{"x": 1}, {"x": 2}]
  assert distributed.any_host(True) and not distributed.any_host(False)
