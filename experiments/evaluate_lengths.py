"""Held-out length evaluation of a trained run: per-token MAE and prompt-boundary MRE next to two baselines.

  python -m experiments.evaluate_lengths --workdir runs/champ [--max_eval_records=2000] [--step=latest|best|N]
  python -m experiments.evaluate_lengths --workdir runs/a --compare=runs/b,runs/c   # + one summary table

Baselines are fit on the run's training split (config data.*), the evaluation uses its eval split; the report is
printed and written to <workdir>/length_eval.json. See lenvm_jax/evaluation/length_eval.py for the definitions.
--compare evaluates more runs the same way (each writes its own length_eval.json) and ends with one table of every
run's all-generator numbers: prompt-boundary MRE against the least-MRE constant, per-token MAE against the position
baseline, and whether the model beats each.
"""

import functools
import json
import os

from absl import flags

from experiments import cli
from lenvm_jax.data import pipeline, prompt_groups
from lenvm_jax.evaluation import prompt_boundary
from lenvm_jax.evaluation import length_eval
from lenvm_jax.decoding.predict import Predictor

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_MAX_EVAL = flags.DEFINE_integer("max_eval_records", 0, "Evaluate on the first N eval records (0 = all).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
_STEP = cli.define_step_flag()
_CELLS = flags.DEFINE_string(
    "cell_separator", "", "prompt_id = <problem><separator><cell> (CHAMP: |): also print the MRE of the model's "
    "L_hat averaged within each (generator, cell), which shows whether its prompt-specific part helps.")
_GROUPING = flags.DEFINE_enum(
    "grouping", "finished", list(prompt_groups.BOUNDARY_GROUPINGS), "Prompt-boundary groups: finished (the "
    "finished completions of each prompt) or reference (every sample, a cut one with its token count; only prompts "
    "with exactly --samples_per_prompt samples).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 0, "--grouping=reference: samples a prompt must have (0 = the "
                                "most common count).")
_COMPARE = flags.DEFINE_list("compare", [], "More run workdirs, evaluated the same way; a summary table follows.")
flags.mark_flags_as_required(["workdir"])


def format_report(report: dict) -> str:
  mre_title, mre_columns = "prompt-boundary MRE: model / best constant / generator baseline", ("model", "constant",
                                                                                                 "generator")
  if "cell_mean" in report["prompt_mre"][prompt_boundary.ALL_GENERATORS]:  # evaluate_lengths --cell_separator.
    mre_title, mre_columns = mre_title + " / model's cell mean", mre_columns + ("cell_mean",)
  tables = (("per-token length MAE (tokens): model / best constant / position baseline", "token_mae",
             ("model", "constant", "position")),
            (mre_title, "prompt_mre", mre_columns),
            ("prompt-boundary calibration (length of the mean return at s_0): model / true", "prompt_calibration",
             ("model", "true")))
  lines = [f"held-out: {report['counts']}"]
  for title, key, columns in tables:
    lines.append(title)
    for scope, values in sorted(report[key].items()):
      lines.append(f"  {prompt_boundary.scope_label(scope):<24} " + " ".join(f"{values[c]:10.4g}" for c in columns))
  return "\n".join(lines)


def format_summary(reports: dict) -> str:
  """One line per run (workdir -> report): the all-generator MRE and MAE next to the baselines they must beat."""
  lines = [f"{'run':<36} {'MRE':>8} {'const':>8} {'beats':>6}   {'MAE':>8} {'position':>8} {'beats':>6}"]
  for workdir, report in reports.items():
    scope = prompt_boundary.ALL_GENERATORS
    mre, mae = report["prompt_mre"][scope], report["token_mae"][scope]
    lines.append(f"{workdir:<36} {mre['model']:8.4f} {mre['constant']:8.4f} {str(mre['model'] < mre['constant']):>6}"
                 f"   {mae['model']:8.3f} {mae['position']:8.3f} {str(mae['model'] < mae['position']):>6}")
  return "\n".join(lines)


def main(argv):
  del argv
  reports = {}
  for workdir in [_WORKDIR.value, *_COMPARE.value]:
    if _COMPARE.value:
      print(f"== {workdir}")
    reports[workdir] = evaluate_run(workdir)
    print(format_report(reports[workdir]))
  if _COMPARE.value:
    print("summary (all generators, held-out):")
    print(format_summary(reports))


def evaluate_run(workdir: str) -> dict:
  """A run's held-out report, also written to <workdir>/length_eval.json."""
  predictor = Predictor(workdir, cli.step_value(_STEP.value))
  config = predictor.config
  train = pipeline.load_source(config, "train")
  evaluation = pipeline.load_source(config, "eval")
  count = len(evaluation) if not _MAX_EVAL.value else min(_MAX_EVAL.value, len(evaluation))
  baselines = length_eval.fit_baselines([train[i] for i in range(len(train))], config.loss.gamma)
  report = length_eval.evaluate(predictor, [evaluation[i] for i in range(count)], baselines, config.loss.gamma,
                                config.data.max_len, _BATCH.value, config.data.max_prompt_len,
                                cell_of=functools.partial(prompt_groups.cell_of, separator=_CELLS.value)
                                if _CELLS.value else None, grouping=_GROUPING.value,
                                samples_per_prompt=_SAMPLES.value)
  report["checkpoint_step"] = predictor.step
  with open(os.path.join(workdir, "length_eval.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  cli.run(main)
