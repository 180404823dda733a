"""Checkpoint faults a run survives (issue 19): only committed steps count, checksums catch damaged files and the
newest intact step is restored instead, a checkpoint of another model names the changed config fields, keep_best
keeps the best step beside the last ones, and kill -9 / SIGTERM / a damaged latest step / a full disk / a second
trainer each leave a run that resumes exactly: the same per-step losses and final params as one uninterrupted run.

Over ~350 lines: one fault per test over one shared trained run (and one shared uninterrupted subprocess run).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenvm_jax import errors
from lenvm_jax.run import checkpoint_layout, workdir_lock
from lenvm_jax.train import checkpointing, trainer
from tests.cli_server import CliServers
from tests.helpers import REPO, TRAIN_STEPS, final_params, leaves, logged, run_config, train_command, wait_for


def _data_iter():
  return iter(grain.MapDataset.range(16).to_iter_dataset())


def _save_steps(workdir, steps, keep=3, keep_best="", metrics=None):
  ckpt = checkpointing.Checkpointer(str(workdir), 1, keep, False, keep_best)
  for step in steps:
    state = {"params": {"w": jnp.full((64,), float(step))}, "step": jnp.asarray(step)}
    ckpt.save(step, state, _data_iter(), metrics=None if metrics is None else {keep_best: metrics[step]})
  ckpt.close()


def _largest_file(step_path):
  files = [os.path.join(root, n) for root, _, names in os.walk(step_path) for n in names
           if n not in (checkpoint_layout.CHECKSUM_FILE, checkpoint_layout.COMMIT_MARKER)]
  return max(files, key=os.path.getsize)


def _flip_bytes(path, at=None):
  data = bytearray(open(path, "rb").read())
  at = len(data) // 2 if at is None else at
  data[at] ^= 0xFF
  open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------------------------------- in-process, no training


def test_only_committed_steps_count(tmp_path):
  _save_steps(tmp_path, [1, 2])
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "999").mkdir()  # Bare numeric directories: hand-made or a copy cut short.
  (checkpoints / "50").mkdir()
  (checkpoints / "50" / "state").mkdir()
  (checkpoints / "3.orbax-checkpoint-tmp").mkdir()  # A save killed mid-way.
  assert checkpoint_layout.complete_steps(str(tmp_path)) == [1, 2] and checkpoint_layout.latest_step(str(tmp_path)) == 2
  assert checkpoint_layout.steps_to_try(str(tmp_path)) == [2, 1]
  ckpt = checkpointing.Checkpointer(str(tmp_path), 1, 3, False)  # A resuming trainer moves them aside.
  assert ckpt.latest_step() == 2 and ckpt.manager.latest_step() == 2
  ckpt.close()
  # orbax removes a killed save's temporary directory itself, in the background: whether it is gone yet is timing.
  assert sorted(n for n in os.listdir(checkpoints) if not n.endswith(".orbax-checkpoint-tmp")) == ["1", "2"]
  rejected = sorted(os.listdir(tmp_path / checkpoint_layout.REJECTED_DIR))
  assert [name.split("-")[0] for name in rejected] == ["50", "999"]
  assert "no commit marker" in (tmp_path / checkpoint_layout.REJECTED_DIR / rejected[1] / "REJECTED.txt").read_text()


def test_checksums_catch_flipped_truncated_and_deleted_files(tmp_path):
  _save_steps(tmp_path, [1])
  step = tmp_path / "checkpoints" / "1"
  assert (step / checkpoint_layout.CHECKSUM_FILE).exists() and checkpoint_layout.verify_checksums(str(tmp_path), 1) is None
  target = _largest_file(step)
  name = os.path.relpath(target, step)
  original = open(target, "rb").read()
  _flip_bytes(target)
  assert checkpoint_layout.verify_checksums(str(tmp_path), 1) == f"{name} does not match its checksum (corrupted)"
  open(target, "wb").write(original[:-7])
  assert checkpoint_layout.verify_checksums(str(tmp_path), 1) == f"{name} has {len(original) - 7} bytes, {len(original)} were " \
                                                      "written"
  os.remove(target)
  assert checkpoint_layout.verify_checksums(str(tmp_path), 1) == f"{name} is missing"


class _Killed(BaseException):
  """Stands for the process dying at the injected point: nothing after it runs (not an Exception, so no handler of
  the library catches it)."""


def _kill_before_checksums_of(step, monkeypatch):
  """Injects the fault of the window between orbax's commit and the checksum file: the process dies there."""
  original = checkpoint_layout.write_checksums

  def write_checksums(workdir, at):
    if at == step:
      raise _Killed()
    return original(workdir, at)
  monkeypatch.setattr(checkpoint_layout, "write_checksums", write_checksums)


def test_a_step_killed_between_commit_and_checksums_does_not_count(tmp_path, monkeypatch, caplog):
  _kill_before_checksums_of(2, monkeypatch)
  ckpt = checkpointing.Checkpointer(str(tmp_path), 1, 3, False)
  for step in (1, 2):
    state = {"params": {"w": jnp.full((64,), float(step))}, "step": jnp.asarray(step)}
    try:
      ckpt.save(step, state, _data_iter())
    except _Killed:
      break
  monkeypatch.undo()
  workdir = str(tmp_path)
  assert checkpoint_layout.committed_steps(workdir) == [1, 2]  # orbax committed both ...
  assert not (tmp_path / "checkpoints" / "2" / checkpoint_layout.CHECKSUM_FILE).exists()
  assert checkpoint_layout.complete_steps(workdir) == [1] and checkpoint_layout.latest_step(workdir) == 1  # ... only 1 counts.
  assert "without its checksums" in checkpoint_layout.why_incomplete(workdir, 2)
  assert checkpoint_layout.steps_to_try(workdir) == [1]
  # The next trainer moves it aside (kept, not deleted) and saves step 2 afresh, checksummed.
  ckpt = checkpointing.Checkpointer(workdir, 1, 3, False)
  assert "checkpoint step 2 is incomplete (committed but without its checksums" in caplog.text
  (rejected,) = os.listdir(tmp_path / checkpoint_layout.REJECTED_DIR)
  assert rejected.startswith("2-") and "without its checksums" in (
      tmp_path / checkpoint_layout.REJECTED_DIR / rejected / "REJECTED.txt").read_text()
  ckpt.save(2, {"params": {"w": jnp.full((64,), 2.0)}, "step": jnp.asarray(2)}, _data_iter())
  ckpt.close()
  assert checkpoint_layout.complete_steps(workdir) == [1, 2] and checkpoint_layout.verify_checksums(workdir, 2) is None


def test_steps_of_a_run_from_before_checksums_still_count(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):  # A run written before checksums existed: no checksum files, no policy file.
    os.remove(tmp_path / "checkpoints" / str(step) / checkpoint_layout.CHECKSUM_FILE)
  os.remove(tmp_path / checkpoint_layout.CHECKSUM_POLICY_FILE)
  assert checkpoint_layout.complete_steps(str(tmp_path)) == [1, 2]
  _save_steps(tmp_path, [3])  # Resumed by today's trainer: its old steps stay, new ones need their checksums.
  assert checkpoint_layout.complete_steps(str(tmp_path)) == [1, 2, 3]
  os.remove(tmp_path / "checkpoints" / "3" / checkpoint_layout.CHECKSUM_FILE)
  assert checkpoint_layout.complete_steps(str(tmp_path)) == [1, 2]


def test_keep_best_keeps_the_best_step_beside_the_last(tmp_path):
  _save_steps(tmp_path, [1, 2, 3, 4], keep=1, keep_best="loss", metrics={1: 3.0, 2: 1.0, 3: 2.0, 4: float("nan")})
  assert checkpoint_layout.complete_steps(str(tmp_path)) == [2, 4]
  assert checkpoint_layout.step_metrics(str(tmp_path), 2) == {"loss": 1.0}
  assert checkpoint_layout.best_step(str(tmp_path), "loss") == 2
  assert checkpoint_layout.steps_to_try(str(tmp_path), "best", keep_best="loss") == [2]
  assert checkpoint_layout.steps_to_try(str(tmp_path), 4) == [4]
  with pytest.raises(errors.CheckpointError, match=r"no complete checkpoint of step 3 \(there are 2, 4\)"):
    checkpoint_layout.steps_to_try(str(tmp_path), 3)
  with pytest.raises(errors.CheckpointError, match="--step=best needs a run trained with checkpoint.keep_best"):
    checkpoint_layout.steps_to_try(str(tmp_path), "best")


def test_a_failed_save_names_the_step_to_resume_from(tmp_path, monkeypatch):
  _save_steps(tmp_path, [5])
  ckpt = checkpointing.Checkpointer(str(tmp_path), 5, 3, False)
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": No space left on device "
                    "[os_error_code='28']")
  monkeypatch.setattr(ckpt.manager, "save", lambda *args, **kwargs: (_ for _ in ()).throw(full))
  with pytest.raises(errors.CheckpointError, match=r"cannot save checkpoint step 10: no space left on device \(.*"
                     r"checkpoints\): free space, then rerun the same command: it resumes from step 5"):
    ckpt.save(10, {"params": {"w": jnp.zeros((4,))}}, _data_iter())
  monkeypatch.setattr(ckpt.manager, "save", lambda *args, **kwargs: (_ for _ in ()).throw(KeyError("a bug")))
  with pytest.raises(KeyError):  # Not the disk: a bug keeps its own exception.
    ckpt.save(15, {"params": {"w": jnp.zeros((4,))}}, _data_iter())
  ckpt.close()


# ------------------------------------------------------------------------------------- readers of a trained run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny run with checkpoints 5 and 10, ranked by eval loss (checkpoint.keep_best)."""
  from experiments.configs import tiny
  config = tiny.get_config()
  config.train.steps, config.train.eval_every, config.mesh.data = 10, 5, 1
  config.checkpoint.keep_best = "loss"
  workdir = tmp_path_factory.mktemp("trained") / "run"
  trainer.train_and_evaluate(run_config(config), str(workdir))
  return workdir, config


def _copy(run, tmp_path):
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run"


@pytest.mark.slow
def test_readers_skip_a_damaged_latest_step_and_say_so(trained_run, tmp_path, caplog):
  from lenvm_jax.decoding.predict import Predictor
  workdir = _copy(trained_run[0], tmp_path)
  assert checkpoint_layout.complete_steps(str(workdir)) == [5, 10]
  intact = Predictor(str(workdir), 5).params
  _flip_bytes(_largest_file(workdir / "checkpoints" / "10"))
  predictor = Predictor(str(workdir))
  assert predictor.step == 5
  assert "checkpoint step 10 cannot be restored" in caplog.text and "does not match its checksum" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, predictor.params, intact)
  with pytest.raises(errors.CheckpointError, match=r"no checkpoint restores \(step 10: .*corrupted\)"):
    Predictor(str(workdir), 10)
  # Without checksums (a run from before them), unreadable metadata is caught by the restore itself.
  os.remove(workdir / checkpoint_layout.CHECKSUM_POLICY_FILE)
  os.remove(workdir / "checkpoints" / "10" / checkpoint_layout.CHECKSUM_FILE)
  (workdir / "checkpoints" / "10" / "state" / "_METADATA").write_bytes(os.urandom(256))
  assert Predictor(str(workdir)).step == 5
  for step in (5, 10):  # Nothing of them restores: one line that names each step's problem.
    (workdir / "checkpoints" / str(step) / checkpoint_layout.CHECKSUM_FILE).unlink(missing_ok=True)
    (workdir / "checkpoints" / str(step) / "state" / "_METADATA").write_bytes(b"garbage")
  with pytest.raises(errors.CheckpointError, match=r"no checkpoint restores \(step 10: .*; step 5: "):
    Predictor(str(workdir))


@pytest.fixture(scope="module")
def clis(tmp_path_factory):
  """The tools (predict, export_hf, and train to its end) run as processes of their own, forked from one server per
  tool (tests/cli_server.py): one python + jax import per tool, not per call."""
  servers = CliServers(tmp_path_factory.mktemp("cli_servers"))
  yield servers
  servers.close()


@pytest.mark.slow
def test_step_flag_picks_latest_best_or_a_number(trained_run, tmp_path, clis):
  workdir, _ = trained_run
  evals = {r["step"]: r["loss"] for r in logged(workdir, "eval").values()}
  best = min(evals, key=lambda s: (evals[s], -s))
  assert checkpoint_layout.best_step(str(workdir), "loss") == best
  out = tmp_path / "p.jsonl"
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt_ids": [3, 4], "completion_ids": [5, 1]}) + "\n")
  for step, want in (("best", best), ("5", 5), ("latest", 10)):
    result = clis.run("predict", f"--workdir={workdir}", f"--input={tmp_path / 'in.jsonl'}", f"--output={out}",
                      f"--step={step}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint step {want})" in result.stdout, result.stdout
  result = clis.run("export_hf", f"--workdir={workdir}", f"--output={tmp_path / 'hf'}", "--step=7")
  assert result.returncode == 2 and "no complete checkpoint of step 7 (there are 5, 10)" in result.stderr
  assert not (tmp_path / "hf").exists()
  from tests.helpers import write_tiny_gguf
  write_tiny_gguf(str(tmp_path / "other.gguf"))  # Another model's tokenizer, more tokens than the run's 64.
  result = clis.run("export_hf", f"--workdir={workdir}", f"--output={tmp_path / 'hf'}",
                    f"--tokenizer={tmp_path / 'other.gguf'}")
  assert result.returncode == 2 and "the model's vocabulary 64 (--tokenizer=" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_resuming_with_another_model_names_the_changed_fields(trained_run, tmp_path):
  workdir = _copy(trained_run[0], tmp_path)
  config = trained_run[1]
  config.model.num_layers += 1
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  with pytest.raises(errors.CheckpointError, match=r"checkpoint step 10 does not match this run's model: .*"
                     r"model\.num_layers: 2 -> 3.*resume with the config the run was trained with"):
    trainer.train_and_evaluate(run_config(config), str(workdir))
  config.model.num_layers -= 1
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before  # Refused before anything was written.


# --------------------------------------------------------------- interrupted trainers resume exactly (subprocesses)


def _run(clis, workdir, check=True):
  """The trainer run to its end (train_command's flags), as a process of its own forked from the train server."""
  command = train_command(workdir)
  assert command[1:3] == ["-m", "experiments.train"]
  result = clis.run("train", *command[3:], timeout=900)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory, clis):
  """The uninterrupted run every interrupted one must match: its per-step train records and final params."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  _run(clis, workdir)
  return logged(workdir), final_params(workdir)


def _assert_exact(workdir, straight_run):
  want, final = straight_run
  got = logged(workdir)
  assert sorted(got) == sorted(want) == list(range(1, TRAIN_STEPS + 1))
  for step in range(1, TRAIN_STEPS + 1):
    assert got[step]["loss"] == want[step]["loss"], step
    assert got[step]["value_mse"] == want[step]["value_mse"], step
  for a, b in zip(leaves(final), leaves(final_params(workdir))):
    np.testing.assert_array_equal(a, b)
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def _start(workdir, steps=None):
  command = train_command(workdir)
  if steps:
    command[command.index(f"--config.train.steps={TRAIN_STEPS}")] = f"--config.train.steps={steps}"
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _committed(workdir, step):
  return step in checkpoint_layout.complete_steps(str(workdir))


@pytest.mark.slow
def test_sigterm_then_a_corrupted_latest_step_resumes_exactly(straight, tmp_path, clis):
  workdir = tmp_path / "run"
  process = _start(workdir)
  wait_for(lambda: _committed(workdir, 10) and max(logged(workdir), default=0) >= 12, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]  # A clean exit ...
  assert "SIGTERM received" in stderr, stderr[-2000:]
  newest = checkpoint_layout.latest_step(str(workdir))
  # ... that saved the step it stopped at.
  assert newest is not None and 10 < newest < TRAIN_STEPS and newest >= max(logged(workdir)), newest
  _flip_bytes(_largest_file(workdir / "checkpoints" / str(newest)))
  result = _run(clis, workdir)
  assert f"checkpoint step {newest} is damaged" in result.stderr and "resuming from checkpoint step 10" in result.stderr
  _assert_exact(workdir, straight)
  assert os.listdir(workdir / checkpoint_layout.REJECTED_DIR)[0].startswith(f"{newest}-")  # Kept aside, not deleted.


@pytest.mark.slow
def test_kill_nine_then_a_truncated_latest_step_and_a_stale_lock_resume_exactly(straight, tmp_path, clis):
  workdir = tmp_path / "run"
  process = _start(workdir)
  wait_for(lambda: _committed(workdir, 10) and max(logged(workdir), default=0) >= 16, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert (workdir / workdir_lock.LOCK_FILE).exists()  # Left behind by the killed trainer.
  killed_at = max(logged(workdir))
  assert killed_at < TRAIN_STEPS
  # A save that died half-way leaves a temporary directory: it must be ignored, not restored.
  half_saved = workdir / "checkpoints" / f"{killed_at + 1}.orbax-checkpoint-tmp-1700000000"
  half_saved.mkdir()
  (half_saved / "garbage").write_text("half written")
  newest = checkpoint_layout.latest_step(str(workdir))
  victim = _largest_file(workdir / "checkpoints" / str(newest))
  with open(victim, "rb+") as f:
    f.truncate(os.path.getsize(victim) // 2)
  (workdir / "checkpoints" / "999").mkdir()
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 17, "split": "tr')  # A record cut by the kill.
  result = _run(clis, workdir)
  assert "taking over the stale workdir lock" in result.stderr
  # Only checksummed steps count, so the truncated newest one is always caught by its checksums.
  assert f"checkpoint step {newest} cannot be restored" in result.stderr, result.stderr[-3000:]
  _assert_exact(workdir, straight)
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == TRAIN_STEPS and config["loss"]["gamma"] == 0.98


# The trainer, killed by SIGKILL at the injected point: after orbax committed step 10, before its checksums.
_KILLED_IN_THE_WINDOW = """
import os, signal, sys
from lenvm_jax.run import checkpoint_layout, workdir_lock
original = checkpoint_layout.write_checksums
def write_checksums(workdir, step):
  if step == 10:
    os.kill(os.getpid(), signal.SIGKILL)
  return original(workdir, step)
checkpoint_layout.write_checksums = write_checksums
from experiments import cli, train
sys.argv = ["train"] + sys.argv[1:]
cli.run(train.main)
"""


@pytest.mark.slow
def test_kill_nine_between_commit_and_checksums_resumes_exactly(straight, tmp_path, clis):
  workdir = tmp_path / "run"
  command = [sys.executable, "-c", _KILLED_IN_THE_WINDOW] + train_command(workdir)[3:]
  killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 10 in checkpoint_layout.committed_steps(str(workdir)) and checkpoint_layout.latest_step(str(workdir)) == 5
  result = _run(clis, workdir)
  assert "checkpoint step 10 is incomplete (committed but without its checksums" in result.stderr
  assert "resuming from checkpoint step 5" in result.stderr
  _assert_exact(workdir, straight)


@pytest.mark.slow
def test_a_second_trainer_on_a_live_workdir_is_refused_and_changes_nothing(straight, tmp_path, clis):
  workdir = tmp_path / "run"
  first = _start(workdir)
  wait_for(lambda: max(logged(workdir), default=0) >= 3, first)
  first.send_signal(signal.SIGSTOP)  # Hold it mid-run while the second one tries.
  try:
    holder = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
    config = (workdir / "config.json").read_bytes()
    second = _run(clis, workdir, check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"the workdir is in use by another trainer (host {holder['host']}, pid {first.pid}" in second.stderr
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text()) == holder
    assert (workdir / "config.json").read_bytes() == config
  finally:
    first.send_signal(signal.SIGCONT)
  _, stderr = first.communicate(timeout=600)
  assert first.returncode == 0, stderr[-2000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, TRAIN_STEPS + 1))  # Not interleaved.
  _assert_exact(workdir, straight)


def _mount_tmpfs(path, size):
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
  return mounted.returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_exactly(straight, tmp_path, clis):
  disk = tmp_path / "disk"
  if not _mount_tmpfs(disk, "64m"):
    pytest.skip("mounting a tmpfs needs root; test_a_failed_save_names_the_step_to_resume_from covers the message")
  try:
    workdir = disk / "run"
    process = _start(workdir)
    wait_for(lambda: _committed(workdir, 10) and max(logged(workdir), default=0) >= 11, process)
    process.send_signal(signal.SIGSTOP)
    with open(disk / "ballast", "wb") as f:  # Fill the disk.
      try:
        while True:
          f.write(b"\0" * (1 << 20))
          f.flush()
      except OSError:
        pass
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no space left on device" in last, last
    resume_from = checkpoint_layout.latest_step(str(workdir))
    assert f"rerun the same command: it resumes from step {resume_from}" in last, last
    assert "Traceback" not in stderr, stderr[-3000:]
    os.remove(disk / "ballast")
    _run(clis, workdir)
    _assert_exact(workdir, straight)
  finally:
    subprocess.run(["umount", str(disk)], check=False)
