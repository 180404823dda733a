"""What a person sees at the console: the tools' own lines and one progress line; the libraries' INFO records (orbax
prints ~30 per checkpoint restore) only with --verbosity (experiments/cli.py)."""

import re
import shutil

import pytest

from tests.helpers import REPO, run_cli, run_config

LEGACY_RUN = REPO / "tests" / "fixtures" / "legacy_run"
ABSL_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\]", re.M)  # absl's record prefix.


def _library_records(stderr: str) -> list[str]:
  """The files (not ours) that logged the absl records in `stderr`."""
  ours = {p.name for p in (REPO / "lenvm_jax").rglob("*.py")} | {p.name for p in (REPO / "experiments").rglob("*.py")}
  return [name for name in ABSL_RECORD.findall(stderr) if name not in ours]


@pytest.mark.slow
def test_export_prints_its_one_line_and_the_libraries_records_only_with_verbosity(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(LEGACY_RUN, workdir)
  plain = run_cli("export_hf", f"--workdir={workdir}", f"--output={tmp_path / 'hf'}")
  assert plain.returncode == 0, plain.stderr[-3000:]
  assert plain.stdout.startswith("exported checkpoint step 4 of ")
  # Only our own records (here: the 8 fake test devices of which the export uses 1) reach the console.
  assert ABSL_RECORD.findall(plain.stderr) and not _library_records(plain.stderr), plain.stderr[-3000:]
  for verbosity in (0, 1):  # absl's levels: INFO, then DEBUG too.
    verbose = run_cli("export_hf", f"--workdir={workdir}", f"--output={tmp_path / f'hf{verbosity}'}",
                      f"--verbosity={verbosity}")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    library = _library_records(verbose.stderr)
    assert len(library) >= 10 and "checkpoint_manager.py" in library, verbose.stderr[-3000:]  # orbax's restore.


@pytest.mark.slow
def test_evaluate_prints_progress_and_its_report_without_library_records(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(LEGACY_RUN, workdir)
  result = run_cli("evaluate", f"--workdir={workdir}", "--prompts=2", "--targets=8", "--betas=0,-4",
                   "--trajectories=2", "--batch_size=2", "--budget=16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert not _library_records(result.stderr), result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("evaluate ")]  # Not a Python warning.
  # 1 unguided decode, 3 rules, 2 betas, the predictions: one line each (no terminal here, so no redraw in place).
  assert [line.split()[1] for line in lines] == [f"{i}/7" for i in range(1, 8)], result.stderr[-3000:]
  assert lines[0].startswith("evaluate 1/7 (14%)  ETA") and re.fullmatch(r"evaluate 7/7 \(100%\)  done in \S+",
                                                                         lines[-1])
  assert "LIFEBench score" in result.stdout


def test_training_shows_one_progress_line_per_log_interval_and_keeps_every_metric_in_the_log(tmp_path, tiny_config,
                                                                                              capsys):
  from lenvm_jax.train import trainer
  import json
  tiny_config.train.steps, tiny_config.train.log_every, tiny_config.train.eval_every = 4, 2, 0
  trainer.train_and_evaluate(run_config(tiny_config), str(tmp_path))
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train ")]
  assert [line.split("  ")[0] for line in lines] == ["train 2/4 (50%)", "train 4/4 (100%)"], lines
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4] and len(train[0]) > 10  # The whole record stays in the log.
  for line, record in zip(lines, train):
    loss = float(re.search(r"  loss (\S+)  ", line).group(1))
    assert loss == pytest.approx(record["loss"], rel=1e-3) and "  tokens/s " in line
  assert re.search(r"  ETA \S+$", lines[0]) and re.search(r"  done in \S+$", lines[1])
