"""Fail safe (issue 19): every user error is one line `error: ...` naming the culprit with exit status 2, nothing a
user did is lost, and no run clobbers another. In-process checks first; the CLI probes run subprocesses (slow).

One file (~700 lines) because it is one table of tools x bad inputs; split by tool it would repeat its probes.
"""

import errno
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from experiments import cli
from lenvm_jax import errors
from lenvm_jax.model import hf_export
from lenvm_jax.run import checkpoint_layout, config_history, workdir_checks, workdir_lock
from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import arrayrecord, jsonl, output_dir, prepare as prepare_lib, reference_jsonl
from lenvm_jax.data.records import RecordError, Trajectory
from lenvm_jax.train import trainer
from tests.cli_server import CliServers
from tests.helpers import REPO, assert_one_error_line, run_config, tiny_model


def _lines(path, lines, mode="w"):
  with open(path, "wb" if isinstance(lines, bytes) else mode, **({} if isinstance(lines, bytes) else
                                                                 {"encoding": "utf-8"})) as f:
    f.write(lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines))
  return str(path)


def _record(**fields):
  return json.dumps({"prompt_ids": [3, 4], "completion_ids": [5, 1], **fields})


# ------------------------------------------------------------------------------------------- the error boundary


def test_user_errors_share_one_base():
  for cls in (ConfigError, RecordError, errors.CheckpointError, errors.WorkdirBusy, output_dir.OutputDirError):
    assert issubclass(cls, errors.UserError), cls


def test_boundary_prints_one_line_and_exits_2_but_keeps_bugs(capsys):
  def user(argv):
    raise errors.UserError.at("bad thing\nover two lines", "where.txt:3", "do this")

  with pytest.raises(SystemExit) as exit_info:
    cli.guard(user)(["prog"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: bad thing over two lines (where.txt:3): do this\n"

  def full_disk(argv):
    raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")

  with pytest.raises(SystemExit) as exit_info:
    cli.guard(full_disk)(["prog"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith("error: no space left on device (/data/run/metrics.jsonl): free space")

  def bug(argv):
    raise KeyError("a real bug")

  with pytest.raises(KeyError):  # A bug keeps its traceback.
    cli.guard(bug)(["prog"])
  with pytest.raises(OSError):  # So does an OSError that is not about the user's files.
    cli.guard(lambda argv: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))(["prog"])


def test_a_writer_thread_that_dies_for_the_disk_is_one_warning_and_other_thread_errors_are_bugs(capsys):
  default_calls = []
  hook = cli._thread_excepthook(lambda args: default_calls.append(args.exc_type))
  thread = threading.Thread(name="checkpoint-writer")
  full = OSError(errno.ENOSPC, "No space left on device")
  hook(threading.ExceptHookArgs([OSError, full, None, thread]))
  assert capsys.readouterr().err == ("warning: checkpoint-writer stopped: no space left on device ([Errno 28] No "
                                     "space left on device)\n")
  hook(threading.ExceptHookArgs([KeyError, KeyError("bug"), None, thread]))
  assert default_calls == [KeyError]


def test_storage_library_errors_are_read_for_their_os_error():
  # What tensorstore (under orbax) raises on a full disk.
  text = ("RESOURCE_EXHAUSTED: Error writing local file \"/w/checkpoints/15.orbax-checkpoint-tmp/state/x\": "
          "Failed to write 440 bytes to file 8: No space left on device [os_error_code='28']")
  assert errors.os_error_reason(ValueError(text)) == "no space left on device"
  assert errors.os_error_reason(ValueError("shapes do not match")) is None


@pytest.mark.parametrize("source, culprit", [
    (None, r"no such config file \(--config=.*missing.py\)"),
    ("def get_config(:\n", r"config file .*c.py:1: SyntaxError"),
    ("import os\nraise RuntimeError('boom')\n", r"config file .*c.py:2: RuntimeError: boom"),
    ("x = 1\n", r"the config file has no get_config\(\) \(--config=.*c.py\)"),
    ("def get_config():\n  return 1 / 0\n", r"config file .*c.py:2: get_config\(\) raised ZeroDivisionError"),
    ("def get_config():\n  return 5\n", r"get_config\(\) returned int, not a config \(--config=.*c.py\)"),
    ("import sys\nsys.exit(3)\n", r"config file .*c.py:2: SystemExit: 3"),
])
def test_a_config_file_that_cannot_be_loaded_names_itself(tmp_path, source, culprit):
  path = tmp_path / ("missing.py" if source is None else "c.py")
  if source is not None:
    path.write_text(source)
  with pytest.raises(errors.UserError, match=culprit):
    cli.load_config_file("config", str(path))
  with pytest.raises(errors.UserError, match=r"the config file is not a file"):
    cli.load_config_file("config", str(tmp_path))


def test_a_config_file_loads_through_the_flag_and_stays_locked():
  from experiments.configs import tiny
  config = cli.load_config_file("config", "experiments/configs/tiny.py")
  assert config.to_dict() == tiny.get_config().to_dict() and config.is_locked


def test_step_flag_values():
  assert cli.step_value("latest") == "latest" and cli.step_value("best") == "best" and cli.step_value("30") == 30
  with pytest.raises(errors.UserError, match=r"--step"):
    cli.step_value("newest")


# ------------------------------------------------------------------------------------------------- bad data


def test_an_id_beyond_int64_is_a_record_error(tmp_path):
  path = _lines(tmp_path / "big.jsonl", [_record(), json.dumps({"prompt_ids": [3, 2**70], "completion_ids": [1]})])
  with pytest.raises(RecordError, match=r"big\.jsonl:2: field 'prompt_ids': token id 1180591620717411303424 at "
                     r"position 1 is outside the vocabulary"):
    jsonl.read_trajectories(path, vocab_size=64, max_len=48)


def test_bytes_that_are_not_utf8_are_an_error_of_their_line(tmp_path):
  path = _lines(tmp_path / "latin1.jsonl", _record().encode() + b"\n" + b'{"prompt_ids": [3], "generator": "caf\xe9"}\n'
                + _record().encode() + b"\n")
  with pytest.raises(RecordError, match=r"latin1\.jsonl:2: field '<encoding>': byte 0xe9 at column 38 is not UTF-8"):
    jsonl.read_trajectories(path, vocab_size=64, max_len=48)
  # Skippable like any bad line: the other records are kept.
  result = prepare_lib.prepare(reference_jsonl.iter_tokenized_jsonl(path, 64, 48, eval_fraction=0.0),
                               str(tmp_path / "out"), vocab_size=64, max_len=48, on_bad_record="skip")
  assert result["records"] == {"train": 2, "eval": 0} and result["skipped"]["by_field"] == {"<encoding>": 1}
  binary = _lines(tmp_path / "binary.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
  with pytest.raises(RecordError, match=r"binary\.jsonl:1: field '<encoding>'"):
    jsonl.read_trajectories(binary, vocab_size=64, max_len=48)


def test_a_byte_order_mark_keeps_the_first_record(tmp_path):
  path = _lines(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + _record(prompt_id="first").encode() + b"\n"
                + _record(prompt_id="second").encode() + b"\n")
  assert [t.prompt_id for t in jsonl.read_trajectories(path, 64, 48)] == ["first", "second"]


def test_an_empty_file_is_an_error_even_when_skipping_bad_records(tmp_path):
  empty = _lines(tmp_path / "empty.jsonl", [""])
  with pytest.raises(RecordError, match=r"empty\.jsonl:0: field '<file>': holds no records"):
    prepare_lib.prepare(reference_jsonl.iter_tokenized_jsonl(empty, 64, 48), str(tmp_path / "out"), vocab_size=64,
                        max_len=48, on_bad_record="skip")
  assert not (tmp_path / "out" / "stats.json").exists()


def test_generators_given_as_numbers_and_strings_import(tmp_path):
  path = _lines(tmp_path / "mixed.jsonl", [_record(generator=3), _record(generator="a"), _record(generator="3")])
  result = prepare_lib.prepare(reference_jsonl.iter_tokenized_jsonl(path, 64, 48, eval_fraction=0.0),
                               str(tmp_path / "out"), vocab_size=64, max_len=48)
  assert sorted(result["splits"]["train"]["generators"]) == ["3", "a"]
  assert (tmp_path / "out" / "stats.json").exists()
  assert [t.generator for t in jsonl.read_trajectories(path, 64, 48)] == ["3", "a", "3"]


def test_an_arrayrecord_directory_without_shards_names_itself(tmp_path):
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FileNotFoundError, match="it is a directory without shards"):
    arrayrecord.split_paths(str(tmp_path / "empty_dir"))
  prepared = tmp_path / "prepared"
  prepared.mkdir()
  arrayrecord.write_shard(arrayrecord.shard_path(str(prepared), "train", 0, 1),
                          [arrayrecord.encode(Trajectory(np.asarray([3]), np.asarray([1])))])
  with pytest.raises(FileNotFoundError, match=r"name a split in it, e\.g\. '.*prepared/train'"):
    arrayrecord.split_paths(str(prepared))


# --------------------------------------------------------------------- trainer start-up: errors before any write


def _start(tiny_config, tmp_path, **fields):
  """A trainer start that must fail: returns the ConfigError; the workdir gets no config.json, checkpoint or
  metrics (and its lock is released)."""
  for dotted, value in fields.items():
    section, name = dotted.split("__")
    with tiny_config.unlocked():
      setattr(tiny_config[section], name, value)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as error:
    trainer.train_and_evaluate(run_config(tiny_config), str(workdir))
  assert sorted(os.listdir(workdir)) == [], os.listdir(workdir)
  return str(error.value)


def test_data_with_no_trainable_record_fails_at_start_not_in_a_spin(tiny_config, tmp_path):
  path = _lines(tmp_path / "unfinished.jsonl", [_record(finished=False)] * 20)
  message = _start(tiny_config, tmp_path, data__source="jsonl", data__train_path=path, mesh__data=1)
  assert message.startswith("config.data.unfinished: all 20 train records are unfinished")
  assert "data.unfinished='as_finished'" in message


def test_an_eval_split_that_is_the_training_split_is_refused(tiny_config, tmp_path):
  path = _lines(tmp_path / "train.jsonl", [_record()] * 16)
  message = _start(tiny_config, tmp_path, data__source="jsonl", data__train_path=path,
                   data__eval_path=str(tmp_path / "." / "train.jsonl"), mesh__data=1)
  assert message.startswith("config.data.eval_path: is the training split")


@pytest.mark.parametrize("fields, culprit", [
    ({"data__source": "jsonl", "data__train_path": "/no/such/file.jsonl"}, "config.data.train_path: cannot read it "
                                                                           "(no such file or directory"),
    ({"data__source": "jsonl", "data__train_path": "/"}, "config.data.train_path: cannot read it (is a directory"),
    ({"data__source": "arrayrecord", "data__train_path": "/"}, "config.data.train_path: cannot read it (no "
                                                               "ArrayRecord shards"),
    ({"data__max_len": 3}, "config.data.max_len: synthetic prompts have up to 12 tokens"),
    ({"mesh__data": 16}, "config.mesh: mesh {'mesh.data': 16"),
])
def test_start_up_mistakes_name_their_config_field(tiny_config, tmp_path, fields, culprit):
  fields.setdefault("mesh__data", 1)
  assert _start(tiny_config, tmp_path, **fields).startswith(culprit)


def test_a_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(errors.UserError, match=r"the workdir is a file \(.*/file\): choose a directory path"):
    workdir_checks.make_workdir(str(tmp_path / "file"))

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)

  monkeypatch.setattr(os, "makedirs", read_only)
  with pytest.raises(errors.UserError, match=r"cannot write the workdir: read-only file system \(.*/ro\): choose a "
                     "writable location"):
    workdir_checks.make_workdir(str(tmp_path / "ro"))


def test_keep_best_names_a_metric_and_needs_an_eval_split(tiny_config):
  tiny_config.checkpoint.keep_best = "accuracy"
  with pytest.raises(ConfigError, match=r"config\.checkpoint\.keep_best: must be '' \(off\) or an eval metric"):
    run_config(tiny_config)
  tiny_config.checkpoint.keep_best = "length_mae"
  tiny_config.data.source, tiny_config.data.train_path = "jsonl", "t.jsonl"
  with pytest.raises(ConfigError, match=r"config\.checkpoint\.keep_best: .*no eval split"):
    run_config(tiny_config)


# ---------------------------------------------------------------------------------------------- the workdir lock


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


@pytest.mark.slow
def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    holder = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    probe = subprocess.run([sys.executable, "-c", "import sys; from lenvm_jax.run import checkpoint_layout, config_history, workdir_checks, workdir_lock; "
                            f"workdir_lock.WorkdirLock({str(tmp_path)!r}).acquire()"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode != 0
    assert f"the workdir is in use by another trainer (host {holder['host']}, pid {os.getpid()}" in probe.stderr
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # Released.


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_is_not(tmp_path, caplog):
  lock = tmp_path / workdir_lock.LOCK_FILE
  lock.write_text(json.dumps({"host": os.uname().nodename, "pid": _dead_pid(), "since": "yesterday"}))
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert "taking over the stale workdir lock" in caplog.text
  lock.write_text(json.dumps({"host": "another-host", "pid": 1, "since": "today"}))
  with pytest.raises(errors.WorkdirBusy, match=r"host another-host, pid 1, since today.*delete the lock file"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert json.loads(lock.read_text())["host"] == "another-host"  # Left alone.


# ------------------------------------------------------------------------------- configs a run trained with


def test_a_resumed_run_keeps_the_config_it_replaced(tiny_config, tmp_path):
  first = run_config(tiny_config)
  config_history.write_config(str(tmp_path), first)
  config_history.write_config(str(tmp_path), first, resumed_from=10)  # Unchanged: nothing kept.
  assert config_history.replaced_config_steps(str(tmp_path)) == []
  tiny_config.loss.gamma = 0.9
  second = run_config(tiny_config)
  config_history.write_config(str(tmp_path), second, resumed_from=10)
  assert config_history.read_config(str(tmp_path), 10).loss.gamma == 0.98  # Steps up to 10 were trained with the first.
  assert config_history.read_config(str(tmp_path), 11).loss.gamma == 0.9
  assert config_history.read_config(str(tmp_path)).loss.gamma == 0.9
  assert config_history.differing_fields(first, second) == ["loss.gamma: 0.98 -> 0.9"]


def test_reading_a_directory_that_is_no_run_is_one_line(tmp_path):
  with pytest.raises(errors.UserError, match=r"not a run directory: it has no config\.json"):
    config_history.read_config(str(tmp_path))
  with pytest.raises(errors.UserError, match=r"no such run directory"):
    config_history.read_config(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------- one import per directory


def test_output_directories_hold_one_import(tmp_path):
  out = tmp_path / "out"
  output_dir.claim(str(out), "import.json", {"input": "a.jsonl", "max_len": 8})
  (out / "train-00000-of-00001.array_record").write_text("shard")
  (out / "stats.json").write_text("{}")
  output_dir.claim(str(out), "import.json", {"input": "a.jsonl", "max_len": 8})  # The same import resumes.
  with pytest.raises(output_dir.OutputDirError, match=r"other settings \(input: 'a\.jsonl' -> 'b\.jsonl'\).*"
                     "--overwrite"):
    output_dir.claim(str(out), "import.json", {"input": "b.jsonl", "max_len": 8})
  with pytest.raises(output_dir.OutputDirError, match=r"holds another import \(import\.json, stats\.json, train-"):
    output_dir.claim(str(out), "generation.json", {"policy": "p"})  # generate into prepare_data's directory.
  assert (out / "train-00000-of-00001.array_record").read_text() == "shard"  # Nothing lost by a refusal.
  (out / "notes.txt").write_text("mine")
  output_dir.claim(str(out), "import.json", {"input": "b.jsonl", "max_len": 8}, overwrite=True)
  assert sorted(os.listdir(out)) == ["import.json", "notes.txt"]  # The old import went whole; other files stay.
  (tmp_path / "file").write_text("x")
  with pytest.raises(output_dir.OutputDirError, match="the output directory is a file"):
    output_dir.claim(str(tmp_path / "file"), "import.json", {})


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
  out = tmp_path / "export"
  assert hf_export.check_export_dir(str(out), overwrite=False) == []
  out.mkdir()
  (out / "tokenizer.json").write_text("{}")
  (out / "pytorch_model.bin").write_text("foreign")
  with pytest.raises(errors.UserError, match=r"not empty \(pytorch_model\.bin, tokenizer\.json\).*--overwrite"):
    hf_export.check_export_dir(str(out), overwrite=False)
  assert hf_export.check_export_dir(str(out), overwrite=True) == ["pytorch_model.bin", "tokenizer.json"]
  (out / "checkpoints").mkdir()
  with pytest.raises(errors.UserError, match="is a training run directory"):
    hf_export.check_export_dir(str(out), overwrite=True)
  (out / "checkpoints").rmdir()
  (out / workdir_lock.LOCK_FILE).write_text("{}")  # A run that holds its lock but has saved nothing yet.
  with pytest.raises(errors.UserError, match="is a training run directory"):
    hf_export.check_export_dir(str(out), overwrite=True)
  # The export code names a run directory's entries itself (model/ sits below run/): the same names.
  assert os.path.join(str(out), hf_export.RUN_DIR_CHECKPOINTS) == checkpoint_layout.checkpoint_dir(str(out))


# --------------------------------------------------------------------------------------- the CLIs (subprocesses)

# The calls below run each tool as its own process, forked from one server per tool (tests/cli_server.py): ~35
# calls of 7 tools, each paying ~4 s of CPU for python + jax imports as a subprocess of its own.
@pytest.fixture(scope="module")
def clis(tmp_path_factory):
  servers = CliServers(tmp_path_factory.mktemp("cli_servers"))
  yield servers
  servers.close()


@pytest.mark.slow
def test_cli_config_files_that_cannot_load_are_one_line(tmp_path, clis):
  (tmp_path / "raises.py").write_text("def get_config():\n  raise KeyError('nope')\n")
  for module, flag in (("train", f"--workdir={tmp_path / 'w'}"), ("compile_check", None)):
    for config, needle in ((tmp_path / "missing.py", "no such config file (--config="),
                           (tmp_path / "raises.py", "raises.py:2: get_config() raised KeyError")):
      assert_one_error_line(clis.run(module, f"--config={config}", *([flag] if flag else [])), needle)
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_flag_mistakes_exit_2_naming_the_field(tmp_path, clis):
  train = ("train", "--config", "experiments/configs/tiny.py", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(clis.run(*train, "--config.train.stepz=5"), "unknown config field (config.train.stepz)",
                  "did you mean 'steps'")
  assert_one_error_line(clis.run(*train, "--config.train.steps=abc"), "--config.train.steps=abc")
  assert_one_error_line(clis.run(*train, "--config.checkpoint.keep_best=accuracy"), "config.checkpoint.keep_best")
  assert_one_error_line(clis.run("predict", "--workdir=x", "--input=y"), "--output")  # A missing required flag.
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_trainer_start_up_mistakes_leave_the_workdir_as_it_was(tmp_path, clis):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"earlier": "config"}')
  unfinished = _lines(tmp_path / "unfinished.jsonl", [_record(finished=False)] * 10)
  base = ("train", "--config", "experiments/configs/tiny.py", f"--workdir={workdir}", "--config.mesh.data=1")
  for args, culprit in [
      (("--config.data.source=jsonl", f"--config.data.train_path={tmp_path / 'missing.jsonl'}"),
       "config.data.train_path"),
      (("--config.data.source=jsonl", f"--config.data.train_path={unfinished}"), "config.data.unfinished"),
      (("--config.data.source=jsonl", f"--config.data.train_path={unfinished}", "--config.loss.gamma=auto"),
       "config.loss.gamma"),
      (("--config.mesh.data=16",), "config.mesh"),
      (("--config.data.max_len=3",), "config.data.max_len")]:
    assert_one_error_line(clis.run(*base, *args, timeout=600), culprit)
  assert (workdir / "config.json").read_text() == '{"earlier": "config"}'  # A failed start rewrites nothing.
  assert sorted(os.listdir(workdir)) == ["config.json"]
  (tmp_path / "a_file").write_text("x")
  assert_one_error_line(clis.run("train", "--config", "experiments/configs/tiny.py", f"--workdir={tmp_path / 'a_file'}"),
                  "the workdir is a file")


@pytest.mark.slow
def test_cli_data_tools_refuse_to_mix_or_misread(tmp_path, clis):
  data = _lines(tmp_path / "a.jsonl", [_record(prompt_id=str(i)) for i in range(8)])
  other = _lines(tmp_path / "b.jsonl", [_record(prompt_id=f"b{i}") for i in range(4)])
  out = tmp_path / "out"
  prepare = ("prepare_data", "--format=tokenized_jsonl", "--vocab_size=64", f"--output_dir={out}")
  assert clis.run(*prepare, f"--input={data}").returncode == 0
  stats = (out / "stats.json").read_text()
  assert_one_error_line(clis.run(*prepare, f"--input={other}"), "holds an import made with other settings", "--overwrite")
  assert (out / "stats.json").read_text() == stats  # The first import is intact.
  assert clis.run(*prepare, f"--input={other}", "--overwrite").returncode == 0
  assert sum(json.loads((out / "stats.json").read_text())["records"].values()) == 4
  (tmp_path / "file").write_text("x")
  assert_one_error_line(clis.run("prepare_data", "--format=tokenized_jsonl", "--vocab_size=64", f"--input={data}",
                       f"--output_dir={tmp_path / 'file'}"), "the output directory is a file")
  empty = _lines(tmp_path / "empty.jsonl", [""])
  assert_one_error_line(clis.run("prepare_data", "--format=tokenized_jsonl", "--vocab_size=64", f"--input={empty}",
                       "--on_bad_record=skip", f"--output_dir={tmp_path / 'e'}"), "holds no records")
  latin = _lines(tmp_path / "latin.jsonl", b'{"prompt_ids": [3], "completion_ids": [1], "generator": "caf\xe9"}\n')
  assert_one_error_line(clis.run("prepare_data", "--format=tokenized_jsonl", "--vocab_size=64", f"--input={latin}",
                       f"--output_dir={tmp_path / 'l'}"), f"{latin}:1: field '<encoding>'")


@pytest.mark.slow
def test_cli_readers_of_a_run_without_checkpoints_or_config(tmp_path, clis):
  (tmp_path / "empty_run").mkdir()
  assert_one_error_line(clis.run("predict", f"--workdir={tmp_path / 'empty_run'}", "--input=x.jsonl",
                       f"--output={tmp_path / 'p.jsonl'}"), "not a run directory")
  assert_one_error_line(clis.run("predict", f"--workdir={tmp_path}", "--input=x.jsonl",
                       f"--output={tmp_path / 'missing_dir' / 'p.jsonl'}"), "the output's directory does not exist")
  run = tmp_path / "started"
  run.mkdir()
  (run / "config.json").write_text(RunConfig.default("tiny").to_json())
  (run / "checkpoints" / "999").mkdir(parents=True)  # An empty step directory is no checkpoint.
  assert_one_error_line(clis.run("export_hf", f"--workdir={run}", f"--output={tmp_path / 'hf'}"), "no complete checkpoint")


# ------------------------------------------------------------------------------------ model files at the boundary


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
  """A tiny model exported as an HF directory (weights + value head), and its ModelConfig."""
  from lenvm_jax.model import hf_export
  from lenvm_jax.model_config import ModelConfig, preset_fields
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 64, "dtype": "float32"})
  _, params = tiny_model(64, seed=1, dtype="float32")
  directory = tmp_path_factory.mktemp("exported") / "hf"
  hf_export.export(params, config, str(directory))
  return directory, config


def _load_hf(directory, config):
  from lenvm_jax import sharding
  from lenvm_jax.model import hf_import
  return hf_import.load_params(str(directory), config, sharding.make_mesh(1, 1, 1))


def test_damaged_or_mis_shaped_model_files_name_the_file(exported_model, tmp_path):
  import shutil
  from safetensors.numpy import save_file
  source, config = exported_model
  directory = tmp_path / "hf"
  shutil.copytree(source, directory)
  weights, head = directory / "model.safetensors", directory / "value_head.safetensors"
  original = weights.read_bytes()
  for damaged in (original[:len(original) // 2], original[:5], b""):
    weights.write_bytes(damaged)
    with pytest.raises(errors.ModelFileError, match=rf"not a readable safetensors file .*\({weights}\): the file is "
                       "damaged or incomplete"):
      _load_hf(directory, config)
  weights.write_bytes(original)
  from safetensors.numpy import load_file
  tensors = load_file(str(head))
  save_file({**tensors, "v_head.fc.weight": np.zeros((3, 3), np.float32)}, str(head))  # Another model's head.
  with pytest.raises(errors.ModelFileError, match=rf"tensor v_head.fc.weight has shape \(3, 3\), the model expects .*"
                     rf"\({head}\)"):
    _load_hf(directory, config)
  head.write_bytes(b"\x10\x00")
  with pytest.raises(errors.ModelFileError, match=rf"\({head}\)"):
    _load_hf(directory, config)


def test_an_index_cannot_point_outside_the_model_directory(exported_model, tmp_path):
  import shutil
  source, config = exported_model
  directory = tmp_path / "hf"
  shutil.copytree(source, directory)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  os.replace(directory / "model.safetensors", elsewhere / "x.safetensors")
  from safetensors import safe_open
  with safe_open(str(elsewhere / "x.safetensors"), framework="numpy") as f:
    names = list(f.keys())
  for target in ("../elsewhere/x.safetensors", str(elsewhere / "x.safetensors")):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    with pytest.raises(errors.UserError, match=r"weight_map\[.*\] names .*, a path outside its directory"):
      _load_hf(directory, config)
  (directory / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(errors.ModelFileError, match=r"not valid JSON .*model.safetensors.index.json"):
    _load_hf(directory, config)


def test_library_logs_of_a_user_fault_carry_no_traceback_but_bugs_keep_theirs():
  import logging
  log_filter = cli._NoTracebackForUserFaults()  # pylint: disable=protected-access
  for error, kept in ((NotADirectoryError(errno.ENOTDIR, "Not a directory", "/w/checkpoints"), False),
                      (ValueError("Error writing: No space left on device [os_error_code='28']"), False),
                      (KeyError("a bug"), True)):
    record = logging.LogRecord("orbax", logging.ERROR, "future.py", 1, "thread raised: %s", (error,),
                               (type(error), error, None))
    assert log_filter.filter(record)
    assert (record.exc_info is not None) == kept, error


def test_a_checkpoint_path_that_is_a_file_is_refused_before_training(tmp_path):
  from lenvm_jax.train import checkpointing
  (tmp_path / "checkpoints").write_text("")
  with pytest.raises(errors.CheckpointError, match=r"the checkpoint path is not a directory \(.*checkpoints\): move "):
    checkpointing.Checkpointer(str(tmp_path), 5, 3, True)


@pytest.mark.slow
def test_convert_gguf_claims_its_output_like_export(tmp_path, clis):
  from tests.helpers import write_tiny_gguf
  source = tmp_path / "tiny.gguf"
  write_tiny_gguf(str(source))
  output = tmp_path / "hf"
  output.mkdir()
  (output / "notes.txt").write_text("someone else's")
  outside = tmp_path / "outside.json"
  outside.write_text("keep me")
  assert_one_error_line(clis.run("convert_gguf", f"--input={source}", f"--output={output}"),
                  "the output directory is not empty (notes.txt)", "--overwrite")
  assert sorted(os.listdir(output)) == ["notes.txt"]
  os.symlink(outside, output / "config.json")  # A planted link: replaced, never written through.
  result = clis.run("convert_gguf", f"--input={source}", f"--output={output}", "--overwrite")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "notes.txt" not in os.listdir(output) and not os.path.islink(output / "config.json")
  assert outside.read_text() == "keep me"
  os.replace(source, output / "tiny.gguf")
  assert_one_error_line(clis.run("convert_gguf", f"--input={output / 'tiny.gguf'}", f"--output={output}", "--overwrite"),
                  "the output directory holds the input: --overwrite would delete it")


@pytest.mark.slow
def test_carve_validation_claims_its_output_and_never_rewrites_its_input(tmp_path, clis):
  records = tmp_path / "r.jsonl"
  _lines(records, [json.dumps({"prompt_ids": [3, 4, 5 + i % 7], "completion_ids": [5, 1], "prompt_id": f"p{i % 8}"})
                   for i in range(40)])
  data = tmp_path / "data"
  result = clis.run("prepare_data", "--format=tokenized_jsonl", f"--input={records}", "--vocab_size=64",
                f"--output_dir={data}", "--max_len=32")
  assert result.returncode == 0, result.stderr[-3000:]
  before = {p.name: p.read_bytes() for p in data.iterdir()}
  for output in (data, data / "dev"):
    assert_one_error_line(clis.run("carve_validation", f"--input_dir={data}", f"--output_dir={output}"),
                    "the output directory is the input directory or inside it")
  assert {p.name: p.read_bytes() for p in data.iterdir()} == before
  assert_one_error_line(clis.run("carve_validation", f"--input_dir={data}", f"--output_dir={tmp_path / 'x'}", "--fraction=nan"),
                  "--fraction")
  assert_one_error_line(clis.run("carve_validation", f"--input_dir={data}", f"--output_dir={tmp_path / 'x'}", "--fraction=0.01"),
                  "--fraction=0.01 leaves the eval side without records")
  assert not list((tmp_path / "x").glob("*.array_record"))
  assert_one_error_line(clis.run("prepare_data", "--format=tokenized_jsonl", f"--input={records},{tmp_path}/./r.jsonl",
                       "--vocab_size=64", f"--output_dir={tmp_path / 'twice'}"), "a file given twice")
  dev = tmp_path / "dev"
  assert clis.run("carve_validation", f"--input_dir={data}", f"--output_dir={dev}").returncode == 0
  assert_one_error_line(clis.run("carve_validation", f"--input_dir={data}", f"--output_dir={dev}", "--seed=5"),
                  "holds an import made with other settings (seed: 1 -> 5)", "--overwrite")
  assert clis.run("carve_validation", f"--input_dir={data}", f"--output_dir={dev}", "--seed=5", "--overwrite"
              ).returncode == 0
  assert json.loads((dev / "carve.json").read_text())["seed"] == 5


# ---------------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("section, field, value", [("optim", "lr", float("inf")), ("optim", "lr", float("nan")),
                                                   ("optim", "b2", float("inf")), ("loss", "huber_delta", float("inf")),
                                                   ("train", "ema_decay", float("nan")),
                                                   ("model", "rope_theta", float("inf"))])
def test_non_finite_config_values_are_refused_naming_the_field(tiny_config, section, field, value):
  with tiny_config.unlocked():
    setattr(tiny_config[section], field, value)
  with pytest.raises(ConfigError, match=rf"^config\.{section}\.{field}: must be a finite number, got {value}$"):
    RunConfig.from_dict(tiny_config)


def test_a_non_finite_train_state_is_never_checkpointed(tmp_path):
  import grain
  import jax.numpy as jnp
  from lenvm_jax.train import checkpointing
  ckpt = checkpointing.Checkpointer(str(tmp_path), 1, 3, False)
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  assert ckpt.save(1, {"params": {"w": jnp.ones((8,))}, "step": jnp.asarray(1)}, data_iter)
  for bad in (float("inf"), float("nan")):
    with pytest.raises(errors.NonFiniteError, match=r"step 2 holds inf or NaN .* the last checkpoint, step 1, is "
                       "intact; resume with a smaller config.optim.lr"):
      ckpt.save(2, {"params": {"w": jnp.ones((8,)).at[3].set(bad)}, "step": jnp.asarray(2)}, data_iter)
  ckpt.close()
  assert checkpoint_layout.complete_steps(str(tmp_path)) == [1]


@pytest.mark.slow
def test_a_diverged_run_stops_after_the_streak_and_checkpoints_nothing_non_finite(tiny_config, tmp_path):
  config = tiny_config
  config.optim.lr, config.optim.warmup_steps = 1e30, 0  # Step 1 throws the weights to ~1e30; every later loss is NaN.
  config.train.steps, config.train.eval_every, config.train.log_every = 50, 0, 1
  config.train.max_nonfinite_streak, config.checkpoint.every_steps, config.mesh.data = 3, 2, 1
  with pytest.raises(errors.NonFiniteError, match=r"3 steps in a row \(config\.train\.max_nonfinite_streak=3\); the "
                     "run diverged"):
    trainer.train_and_evaluate(run_config(config), str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]  # Stopped at the streak, not step 50.
  assert checkpoint_layout.complete_steps(str(tmp_path)) == []  # Steps 2 and 4 were due but non-finite.


# ------------------------------------------------------------------------------------ writes that cannot escape


def test_writes_replace_a_planted_symlink_instead_of_following_it(tmp_path):
  from lenvm_jax import files
  outside = tmp_path / "outside.txt"
  outside.write_text("precious")
  out = tmp_path / "out"
  out.mkdir()
  for name in ("import.json", "import.json.tmp", ".import.json.tmp"):  # The marker and temporary names of old.
    os.symlink(outside, out / name)
  output_dir.claim(str(out), "import.json", {"input": "a"})
  assert outside.read_text() == "precious"
  assert not os.path.islink(out / "import.json") and json.loads((out / "import.json").read_text()) == {"input": "a"}
  os.symlink(outside, out / "report.md")
  files.write_atomic(str(out / "report.md"), "new")
  assert outside.read_text() == "precious" and (out / "report.md").read_text() == "new"
  with files.atomic_path(str(out / "weights.bin")) as tmp:
    assert os.path.dirname(tmp) == str(out) and not os.path.islink(tmp)
    with open(tmp, "wb") as f:
      f.write(b"abc")
  assert (out / "weights.bin").read_bytes() == b"abc"
  with pytest.raises(RuntimeError), files.atomic_path(str(out / "half.bin")) as tmp:
    raise RuntimeError("the writer failed")
  assert not (out / "half.bin").exists() and sorted(os.listdir(out)) == sorted(
      ["import.json", "import.json.tmp", ".import.json.tmp", "report.md", "weights.bin"])  # No temporaries left.
  shard = arrayrecord.shard_path(str(out), "train", 0, 1)
  os.symlink(outside, shard)
  arrayrecord.write_shard(shard, [arrayrecord.encode(Trajectory(np.asarray([3]), np.asarray([1])))])
  assert outside.read_text() == "precious" and not os.path.islink(shard) and len(arrayrecord.split_paths(shard)) == 1
  # The workdir's write probe and the lock's private file are created exclusively too.
  os.symlink(outside, out / f".write_test.{os.getpid()}")
  workdir_checks.make_workdir(str(out))
  with workdir_lock.WorkdirLock(str(out)):
    pass
  assert outside.read_text() == "precious"


def test_a_report_from_nothing_keeps_the_earlier_one(tmp_path):
  from lenvm_jax import files
  report = tmp_path / "report.json"
  files.write_report(str(report), '{"mre": 0.3}', items=12, what="prompts", where="--output")
  with pytest.raises(errors.UserError, match=r"no prompts to report \(the existing report is kept\) \(--output\)"):
    files.write_report(str(report), '{"mre": null}', items=0, what="prompts", where="--output")
  assert report.read_text() == '{"mre": 0.3}'


@pytest.mark.parametrize("name", ["../elsewhere/x.safetensors", "/etc/passwd", "a/../../b", "", "a\\..\\b"])
def test_names_read_from_files_stay_inside_their_directory(tmp_path, name):
  from lenvm_jax import files
  with pytest.raises(errors.UserError, match="a path outside its directory"):
    files.inside(str(tmp_path), name, "index")
  assert files.inside(str(tmp_path), "sub/model-00001.safetensors", "index") == str(tmp_path /
                                                                                     "sub/model-00001.safetensors")


@pytest.mark.parametrize("change, culprit", [
    (lambda c: c["train"].update(steps=None), r"config\.train\.steps: must be an integer, got None"),
    (lambda c: c["optim"].update(lr="1e-3"), r"config\.optim\.lr: must be a number, got '1e-3'"),
    (lambda c: c["train"].update(freeze_trunk=1), r"config\.train\.freeze_trunk: must be true or false, got 1"),
    (lambda c: c["data"]["synthetic"].update(hazards=[0.1, "x"]), r"config\.data\.synthetic\.hazards: must be a "
     r"list of numbers"),
])
def test_a_config_json_of_the_wrong_types_names_the_field(tiny_config, change, culprit):
  config = tiny_config.to_dict()
  change(config)
  with pytest.raises(ConfigError, match=culprit):
    RunConfig.from_dict(config)
  for whole in ([], 5, None):  # A config.json that holds no dict at all.
    with pytest.raises(ConfigError, match=r"^config: must be a dict of sections"):
      RunConfig.from_dict(whole)


def test_a_lock_that_is_no_regular_file_is_refused_not_followed(tmp_path):
  outside = tmp_path / "outside.txt"
  outside.write_text("precious")
  for make in (lambda p: p.mkdir(), lambda p: os.symlink(outside, p)):
    workdir = tmp_path / f"w{len(os.listdir(tmp_path))}"
    workdir.mkdir()
    make(workdir / workdir_lock.LOCK_FILE)
    with pytest.raises(errors.WorkdirBusy, match=r"the workdir lock is not a regular file \(.*\.lock\): no trainer "):
      workdir_lock.WorkdirLock(str(workdir)).acquire()
  assert outside.read_text() == "precious"
