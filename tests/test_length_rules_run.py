"""A trained (tiny) run through experiments.evaluate under every rule convention: the lengths a user gets.

The default rules' guarantees hold whatever the LenVM learned: Equal To ends on its target whenever EOS is among the
candidates there, At Least right at it, At Most within it and never empty by choice. The paper's literal rules are
still selectable, and the report's lengths and empty / cut shares expose what their scores hide."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_config

TARGETS = (8, 16, 24)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from experiments.configs import tiny
  from lenvm_jax.train import trainer
  config = tiny.get_config()
  config.mesh.data = 1
  config.train.eval_every = 0
  workdir = tmp_path_factory.mktemp("length_rules") / "run"
  trainer.train_and_evaluate(run_config(config), str(workdir))
  return workdir


def _evaluate(workdir, *flags):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", "--prompts=32",
       f"--targets={','.join(map(str, TARGETS))}", "--betas=0", "--trajectories=8", "--budget=16", "--batch_size=32",
       *flags], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((workdir / "evaluate" / "report.json").read_text())["length_instruction"], result


@pytest.mark.slow
def test_default_rules_give_the_lengths_asked_for(tiny_run):
  report, printed = _evaluate(tiny_run)
  for target in map(str, TARGETS):
    equal_to, at_most, at_least = (report[rule][target] for rule in ("equal_to", "at_most", "at_least"))
    assert abs(equal_to["guided"]["mean_length"] - int(target)) <= 1.0, equal_to
    assert at_least["guided"]["mean_length"] >= int(target) and at_least["guided"]["deviation"] >= 0
    assert at_least["guided"]["mean_length"] <= int(target) + 3 and at_least["guided"]["cut"] == 0
    guided, unguided = at_most["guided"], at_most["unguided"]
    assert guided["score"] == 100.0 and guided["cut"] == 0
    assert guided["empty"] == 0, at_most  # Not even the model's own EOS-first answers.
    assert guided["mean_length"] >= 0.5 * min(unguided["mean_length"], int(target)), at_most
    for rule in ("equal_to", "at_most", "at_least"):
      assert {"mean_length", "empty", "cut", "score"} <= set(report[rule][target]["guided"])
  assert "empty" in printed.stdout and "len" in printed.stdout


@pytest.mark.slow
def test_paper_rules_stay_selectable_and_the_report_shows_what_they_do(tiny_run):
  report, _ = _evaluate(tiny_run, "--length_rules=paper", "--settings=paper_lifebench", "--candidates=9")
  for target in map(str, TARGETS):
    at_most, at_least = report["at_most"][target]["guided"], report["at_least"][target]["guided"]
    # Literal argmax / argmin of V: At Most ends at once whenever EOS is offered, At Least runs to the limit;
    # both score 100 and the lengths beside the score say why.
    assert at_most["score"] == 100.0 and at_most["empty"] > 0.5
    assert at_least["cut"] > 0.5 and at_least["mean_length"] > 1.5 * int(target)
  settings = json.loads((tiny_run / "evaluate" / "report.json").read_text())["sampling"]
  assert (settings["top_k"], settings["top_p"], settings["filter_style"]) == (15, 0.999, "reference")


@pytest.mark.slow
def test_bad_sampling_flags_are_one_line_errors(tiny_run):
  result = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={tiny_run}", "--top_p=1.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: --top_p")


@pytest.mark.slow
def test_the_reference_guidance_modes_run_from_the_command_line(tiny_run):
  """--equal_to=soft (the reference's eq_soft) and a --value_mode sweep (its expectation guidance, scale = beta)."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={tiny_run}", "--prompts=32", "--targets=16",
       "--betas=0.5,2", "--trajectories=8", "--budget=64", "--batch_size=32", "--equal_to=soft", "--value_mode=mul",
       "--length_rules=reference_lifebench", "--value_entropy_threshold=0.01"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tiny_run / "evaluate" / "report.json").read_text())
  assert (report["sampling"]["equal_to"], report["sampling"]["value_mode"]) == ("soft", "mul")
  sweep = report["quality_vs_length"]["sweep"]
  # mul with scale < 1 aims the mean u below the model's own: shorter answers than scale > 1.
  assert sweep[0]["mean_length"] < sweep[1]["mean_length"], sweep
  # eq_soft tilts toward a mean u over the candidates, EOS (u = 0) among them: with this barely trained LenVM it
  # mixes "end now" with "continue long" and ends early; the lengths beside the score show it.
  soft = report["length_instruction"]["equal_to"]["16"]["guided"]
  assert soft["count"] == 32 and 1.0 <= soft["mean_length"] <= 32 and 0.0 <= soft["empty"] <= 1.0
