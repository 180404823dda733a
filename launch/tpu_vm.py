"""Train on a Cloud TPU VM slice with gcloud: create -> copy code -> install -> train on all workers -> delete.

  python launch/tpu_vm.py --name=lenvm-v4 --zone=us-central2-b --accelerator_type=v4-16 [--spot | --queued] \
      --config=experiments/configs/synthetic.py --workdir=/mnt/bucket/runs/v4 [--dry_run] \
      -- --config.train.steps=20000

Every worker runs the same trainer command (`--worker=all`); the trainer starts jax.distributed itself (it detects
the TPU VM slice), so no coordinator flags are needed. Output of all workers streams here and into --log_file.
On a multi-worker slice the workdir must be storage that every worker sees (e.g. a gcsfuse-mounted bucket):
checkpoints are written by all workers. The slice is deleted when the run ends, fails or is interrupted, unless
--keep. --dry_run prints the exact gcloud commands, one per line, and runs nothing. Standard library only.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script: find `launch`.
from launch import repo  # noqa: E402  pylint: disable=g-import-not-at-top
from lenvm_jax.run.workdir_checks import is_url  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = repo.REPO
REMOTE_DIR = "lenvm"  # Under the remote user's home.
ARCHIVE = "lenvm.tar.gz"


def parse_args(argv: list[str]) -> argparse.Namespace:
  if "--" in argv:
    split = argv.index("--")
    argv, trainer_flags = argv[:split], argv[split + 1:]
  else:
    trainer_flags = []
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", required=True, help="TPU VM (node) name.")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="gcloud project; default: gcloud's configured one.")
  parser.add_argument("--accelerator_type", required=True, help="Slice type, e.g. v4-8, v4-32, v5litepod-16.")
  parser.add_argument("--runtime_version", default="tpu-ubuntu2204-base", help="TPU VM software version.")
  parser.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, can be preempted).")
  parser.add_argument("--queued", action="store_true",
                      help="Request through a queued resource and wait until it is ACTIVE.")
  parser.add_argument("--valid_until", default=None,
                      help="Queued only: give up on the request after this duration, e.g. 6h.")
  parser.add_argument("--config", required=True, help="Trainer config, relative to the repo root.")
  parser.add_argument("--workdir", required=True, help="Trainer workdir on the workers (shared on multi-worker).")
  parser.add_argument("--log_file", default=None, help="Local copy of the streamed output (default: <name>.log).")
  parser.add_argument("--keep", action="store_true", help="Do not delete the slice at the end.")
  parser.add_argument("--dry_run", action="store_true", help="Print the gcloud commands; run nothing.")
  args = parser.parse_args(argv)
  args.trainer_flags = trainer_flags
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
    parser.error(f"--name {args.name!r}: lowercase letters, digits and '-', starting with a letter")
  if not re.fullmatch(r"v\d+[a-z]*(pod)?-\d+", args.accelerator_type):
    parser.error(f"--accelerator_type {args.accelerator_type!r}: expected e.g. v4-8, v5litepod-16, v6e-8")
  if args.valid_until and not args.queued:
    parser.error("--valid_until needs --queued")
  if is_url(args.workdir):
    parser.error(f"--workdir {args.workdir!r} is a URL: the trainer writes to local paths; mount the bucket on every "
                 "worker (Cloud Storage FUSE) and pass the mount path")
  try:
    args.config = repo.config_path(args.config)
  except ValueError as e:
    parser.error(str(e))
  for flag in trainer_flags:
    if not flag.startswith("--config."):
      parser.error(f"trainer flag {flag!r} after '--': only --config.<field>=<value> overrides belong there")
  return args


class Commands:
  """The gcloud command lines of one run, built from the parsed arguments (lists of argv, never shell strings)."""

  def __init__(self, args: argparse.Namespace, archive: str):
    self.args = args
    self.archive = archive
    self.location = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

  def create(self) -> list[str]:
    a = self.args
    if a.queued:
      command = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
                 f"--accelerator-type={a.accelerator_type}", f"--runtime-version={a.runtime_version}"]
      if a.valid_until:
        command.append(f"--valid-until-duration={a.valid_until}")
    else:
      command = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name,
                 f"--accelerator-type={a.accelerator_type}", f"--version={a.runtime_version}"]
    return command + (["--spot"] if a.spot else []) + self.location

  def queued_state(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.args.name,
            "--format=value(state.state)"] + self.location

  def copy(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", self.archive, f"{self.args.name}:~/{ARCHIVE}",
            "--worker=all"] + self.location

  def _ssh(self, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.args.name, "--worker=all",
            f"--command={remote}"] + self.location

  def install(self) -> list[str]:
    remote = (f"set -e; rm -rf ~/{REMOTE_DIR}; mkdir -p ~/{REMOTE_DIR}; tar xzf ~/{ARCHIVE} -C ~/{REMOTE_DIR}; "
              f"cd ~/{REMOTE_DIR}; python3 -m venv .venv; .venv/bin/pip install -q -r requirements.txt "
              f"{shlex.quote(f'jax[tpu]=={repo.jax_version()}')}")
    return self._ssh(remote)

  def train(self) -> list[str]:
    a = self.args
    trainer = [".venv/bin/python", "-m", "experiments.train", f"--config={a.config}", f"--workdir={a.workdir}"]
    return self._ssh(f"cd ~/{REMOTE_DIR} && " + shlex.join(trainer + a.trainer_flags))

  def delete(self) -> list[str]:
    if self.args.queued:  # --force deletes the node with the request.
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.args.name, "--force", "--quiet",
              "--async"] + self.location
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.args.name, "--quiet", "--async"] + self.location

  def plan(self) -> list[list[str]]:
    """The commands in order, as --dry_run prints them (the queued wait polls `queued_state` until ACTIVE)."""
    steps = [self.create()] + ([self.queued_state()] if self.args.queued else [])
    steps += [self.copy(), self.install(), self.train()]
    return steps + ([] if self.args.keep else [self.delete()])


def make_archive(path: str):
  """The code to ship: git-tracked and untracked-but-not-ignored files (no venvs, runs or data)."""
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout.split(b"\0")
  files = [f.decode() for f in files if f and os.path.isfile(os.path.join(REPO, f.decode()))]
  subprocess.run(["tar", "czf", path, "-C", REPO, "--null", "-T", "-"], input="\0".join(files).encode(), check=True)


def _run(command: list[str], log=None):
  print("+ " + shlex.join(command), flush=True)
  if log is None:
    subprocess.run(command, check=True)
    return
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
    for line in proc.stdout:  # Stream all workers' output here and to the log file.
      sys.stdout.write(line)
      log.write(line)
      log.flush()
  if proc.returncode:
    raise subprocess.CalledProcessError(proc.returncode, command)


def _wait_active(commands: Commands, poll_s: float = 30.0):
  while True:
    state = subprocess.run(commands.queued_state(), check=True, capture_output=True, text=True).stdout.strip()
    print(f"queued resource {commands.args.name}: {state}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"queued resource {commands.args.name} is {state}")
    time.sleep(poll_s)


def main(argv: list[str]):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    commands = Commands(args, os.path.join(tmp, ARCHIVE))
    if args.dry_run:
      for command in commands.plan():
        print(shlex.join(command))
      return
    make_archive(commands.archive)
    _run(commands.create())
    try:
      if args.queued:
        _wait_active(commands)
      _run(commands.copy())
      _run(commands.install())
      with open(args.log_file or f"{args.name}.log", "a", encoding="utf-8") as log:
        _run(commands.train(), log)
    finally:
      if not args.keep:
        _run(commands.delete())


if __name__ == "__main__":
  main(sys.argv[1:])
