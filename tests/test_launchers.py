"""Dry runs of the launchers: the gcloud TPU-VM workflow and the XManager job specs (in the launcher's own venv)."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, pinned_venv

CONFIG = "experiments/configs/tiny.py"


def _tpu_vm(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "launch/tpu_vm.py", *args], cwd=REPO, capture_output=True, text=True)


def _plan(*args) -> list[list[str]]:
  result = _tpu_vm("--dry_run", *args)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _flags(command: list[str]) -> set[str]:
  return {arg.split("=", 1)[0] for arg in command if arg.startswith("--")}


def test_tpu_vm_dry_run_commands():
  plan = _plan("--name=lenvm-v4", "--zone=us-central2-b", "--accelerator_type=v4-16", "--spot",
               f"--config={REPO / CONFIG}",  # Absolute here: shipped relative to the repo root.
               "--workdir=/mnt/bucket/runs/v4", "--", "--config.train.steps=100", "--config.loss.gamma=0.99")
  assert [c[:5] for c in plan] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                   for verb in ("create", "scp", "ssh", "ssh", "delete")]
  create, copy, install, train, delete = plan
  assert create[5:] == ["lenvm-v4", "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base", "--spot",
                        "--zone=us-central2-b"]
  assert copy[5].endswith("lenvm.tar.gz") and copy[6] == "lenvm-v4:~/lenvm.tar.gz"
  assert all("--worker=all" in c for c in (copy, install, train))
  remote_install = install[install.index("--worker=all") + 1].removeprefix("--command=")
  assert "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in remote_install
  remote_train = train[train.index("--worker=all") + 1].removeprefix("--command=")
  assert remote_train == ("cd ~/lenvm && .venv/bin/python -m experiments.train --config=experiments/configs/tiny.py "
                          "--workdir=/mnt/bucket/runs/v4 --config.train.steps=100 --config.loss.gamma=0.99")
  assert delete[5:] == ["lenvm-v4", "--quiet", "--async", "--zone=us-central2-b"]

  queued = _plan("--name=q1", "--zone=europe-west4-a", "--project=my-proj", "--accelerator_type=v5litepod-16",
                 "--queued", "--valid_until=6h", f"--config={CONFIG}", "--workdir=/w", "--keep")
  assert [c[3:5] for c in queued] == [["queued-resources", "create"], ["queued-resources", "describe"],
                                      ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]  # --keep: no delete.
  assert queued[0][5:] == ["q1", "--node-id=q1", "--accelerator-type=v5litepod-16",
                           "--runtime-version=tpu-ubuntu2204-base", "--valid-until-duration=6h",
                           "--zone=europe-west4-a", "--project=my-proj"]
  assert all(c[-2:] == ["--zone=europe-west4-a", "--project=my-proj"] for c in queued)

  if shutil.which("gcloud"):  # Every flag we pass exists in the installed gcloud (its help works offline).
    for command in (create, queued[0], train):
      help_text = subprocess.run(command[:5] + ["--help"], capture_output=True, text=True, timeout=120).stdout
      assert _flags(command) <= set(re.findall(r"--[a-z][a-z-]*", help_text)), command[:5]


@pytest.mark.parametrize("args, message", [
    (["--accelerator_type=tpu4"], "--accelerator_type 'tpu4'"),
    (["--accelerator_type=v4-8", "--name=Bad_Name"], "--name 'Bad_Name'"),
    (["--accelerator_type=v4-8", "--valid_until=1h"], "--valid_until needs --queued"),
    (["--accelerator_type=v4-8", "--", "--workdir=/x"], "only --config.<field>=<value>"),
    (["--accelerator_type=v4-8", "--config=/etc/hostname"], "must lie inside the repo"),
    (["--accelerator_type=v4-8", "--config=experiments/configs/nope.py"], "no such file"),
    (["--accelerator_type=v4-8", "--workdir=gs://b/runs"], "--workdir 'gs://b/runs' is a URL"),
])
def test_tpu_vm_bad_arguments_are_named(args, message):
  base = {"--name": "ok", "--zone": "z", "--config": CONFIG, "--workdir": "/w"}
  split = args.index("--") if "--" in args else len(args)
  given = {a.split("=")[0] for a in args[:split]}
  head = [f"{k}={v}" for k, v in base.items() if k not in given]
  result = _tpu_vm(*head, *args[:split], "--dry_run", *args[split:])
  assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def launch_python():
  """The launcher venv: created once (~30 s with the pins), reused while launch/requirements.txt is unchanged."""
  requirements = REPO / "launch" / "requirements.txt"
  return pinned_venv(".venv-launch", ["-r", str(requirements)], requirements.read_text())


def _xm(python, *args) -> subprocess.CompletedProcess:
  return subprocess.run([python, "launch/xm_launch.py", f"--config={CONFIG}", "--dry_run", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_xm_dry_run_job_specs(launch_python):
  result = _xm(launch_python, "--executor=vertex", "--accelerator=A100", "--accelerator_count=8",
               "--workdir_root=gs://bucket/runs", "--experiment_title=gsweep",
               "--sweep=config.loss.gamma=0.99,0.997", "--sweep=config.optim.lr=1e-3,3e-4")
  assert result.returncode == 0, result.stderr
  jobs = json.loads(result.stdout)
  assert [j["name"] for j in jobs] == ["gamma=0.99,lr=1e-3", "gamma=0.99,lr=3e-4", "gamma=0.997,lr=1e-3",
                                       "gamma=0.997,lr=3e-4"]
  job = jobs[1]
  assert job["executor"] == {"type": "Vertex", "resources": {"A100": 8}, "topology": None}
  # The trainer writes local paths: on Vertex the bucket is mounted at /gcs/<bucket>.
  assert job["args"] == {"config": CONFIG, "workdir": "/gcs/bucket/runs/gsweep/gamma=0.99,lr=3e-4",
                         "config.loss.gamma": "0.99", "config.optim.lr": "3e-4"}
  assert job["command"] == ["python", "-m", "experiments.train", f"--config={CONFIG}",
                            "--workdir=/gcs/bucket/runs/gsweep/gamma=0.99,lr=3e-4", "--config.loss.gamma=0.99",
                            "--config.optim.lr=3e-4"]
  image = job["executable"]
  assert image["entrypoint"] == "experiments.train" and image["path"] == str(REPO)
  assert "RUN python -m pip install 'jax[cuda12]==0.10.2'" in image["docker_instructions"]

  result = _xm(launch_python, "--executor=gke", "--accelerator=TPU_V4", "--topology=2x2x2", "--zip",
               "--sweep=config.loss.gamma=0.99,0.997", "--sweep=config.optim.lr=1e-3,3e-4")
  assert result.returncode == 0, result.stderr
  jobs = json.loads(result.stdout)
  assert [j["name"] for j in jobs] == ["gamma=0.99,lr=1e-3", "gamma=0.997,lr=3e-4"]
  assert jobs[0]["executor"] == {"type": "Kubernetes", "resources": {"TPU_V4": 8}, "topology": "2x2x2",
                                 "tpu_runtime_version": "tpu-ubuntu2204-base"}
  assert "RUN python -m pip install 'jax[tpu]==0.10.2'" in jobs[0]["executable"]["docker_instructions"]

  result = _xm(launch_python, f"--config={REPO / CONFIG}")  # Local executor, CPU, no sweep: one job.
  assert result.returncode == 0, result.stderr
  [job] = json.loads(result.stdout)
  assert job["args"]["config"] == CONFIG  # Relative to the repo root, where the image has the code.
  assert job["executor"]["type"] == "Local" and job["executor"]["resources"] == {}
  assert not any("jax[" in step for step in job["executable"]["docker_instructions"])


@pytest.mark.parametrize("args, message", [
    (["--accelerator=TPU_V4"], "needs --topology"),
    (["--accelerator=A100", "--topology=2x2"], "--topology is for TPUs"),
    (["--zip", "--sweep=config.loss.gamma=0.9,0.99", "--sweep=config.optim.lr=1e-3"], "equal length"),
    (["--executor=gke", "--accelerator=TPU_V4", "--topology=2x2x1", "--workdir_root=gs://b/runs"],
     "the trainer writes local paths"),
])
def test_xm_bad_arguments_are_named(launch_python, args, message):
  result = _xm(launch_python, *args)
  assert result.returncode != 0 and message in result.stderr, result.stderr
