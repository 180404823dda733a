"""Held-out length evaluation of a trained run: per-token MAE and MRE and prompt-boundary MRE next to two baselines;
per-token MRE and the prompt-boundary grouping under both definitions side by side (ours and the reference's).

  python -m experiments.evaluate_lengths --workdir runs/champ [--max_eval_records=2000] [--step=latest|best|N]
  python -m experiments.evaluate_lengths --workdir runs/a --compare=runs/b,runs/c   # + one summary table

Baselines are fit on the run's training split (config data.*), the evaluation uses its eval split; the report is
printed and written to <workdir>/length_eval.json. See lenvm_jax/evaluation/length_eval.py for the definitions.
--compare evaluates more runs the same way (each writes its own length_eval.json) and ends with one table of every
run's all-generator numbers: prompt-boundary MRE against the least-MRE constant, per-token MAE against the position
baseline, and whether the model beats each, then every predictor with its bootstrap interval over held-out problems.
The prompt-only predictors (a task's least-MRE length, a within-task fit on prompt features) read the prompt's text
through --tokenizer (default: the run's model.init_from, when it is a GGUF or an HF directory with a tokenizer).
"""

import dataclasses
import functools
import json
import os

from absl import flags

from experiments import cli
from lenvm_jax import files
from lenvm_jax.data import cut_report, pipeline, prompt_groups
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.evaluation import length_eval

_RUN = cli.run_flags()
_MAX_EVAL = flags.DEFINE_integer("max_eval_records", 0, "Evaluate on the first N eval records (0 = all).")
_BATCH = cli.batch_size_flag(16)
_CELLS = flags.DEFINE_string(
    "cell_separator", "", "prompt_id = <problem><separator><cell> (CHAMP: |): also print the MRE of the model's "
    "L_hat averaged within each (generator, cell), which shows whether its prompt-specific part helps.")
_GROUPING = flags.DEFINE_enum(
    "grouping", "finished", list(prompt_groups.BOUNDARY_GROUPINGS), "Prompt-boundary groups: finished (the "
    "finished completions of each prompt) or reference (every sample, a cut one with its token count; only prompts "
    "with exactly --samples_per_prompt samples).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 0, "--grouping=reference: samples a prompt must have (0 = the "
                                "most common count).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer (GGUF, HF dir, tokenizer.json, SentencePiece) that decodes prompts for the feature "
    "predictor's numbers and words; default the run's model.init_from; '' = prompt token counts only.")
_EVAL_PATH = flags.DEFINE_string(
    "eval_path", None, "Held-out records to evaluate on, read as the run's data.source reads data.eval_path (default: "
    "the run's own data.eval_path; e.g. a run trained with data.eval_path='' to skip the trainer's own eval).")
_REUSE = flags.DEFINE_bool(
    "reuse", False, "Read a run's length_eval.json instead of evaluating again when it was written for the same "
    "checkpoint step and the same evaluation flags (a job that evaluated each run as it finished, then compares).")
_BOOTSTRAP_SEED = flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the bootstrap resamples over problems.")
_COMPARE = flags.DEFINE_list("compare", [], "More run workdirs, evaluated the same way; a summary table follows.")


def main(argv):
  del argv
  reports = {}
  for workdir in [_RUN.workdir.value, *_COMPARE.value]:
    if _COMPARE.value:
      print(f"== {workdir}")
    reports[workdir] = evaluate_run(workdir)
    print(length_eval.format_report(reports[workdir]))
  if _COMPARE.value:
    print("summary (all generators, held-out):")
    print(length_eval.format_summary(reports))


def prompt_describer(config):
  """prompt ids -> text for the feature predictor, from --tokenizer or the run's model.init_from; None: none given."""
  path = _TOKENIZER.value if _TOKENIZER.value is not None else config.model.init_from
  if not path:
    return None
  try:
    tokenizer = load_tokenizer(path)
  except (OSError, ValueError) as e:
    if _TOKENIZER.value:  # Asked for by name: a wrong path is the user's mistake.
      raise ValueError(f"--tokenizer={path}: {e}") from None
    print(f"no tokenizer in model.init_from={path} ({e}): the feature predictor reads prompt token counts only")
    return None
  return tokenizer.decode


def evaluate_run(workdir: str) -> dict:
  """A run's held-out report, also written to <workdir>/length_eval.json."""
  predictor = cli.load_predictor(_RUN, workdir)
  config = predictor.config
  train = pipeline.load_source(config, "train")
  if _EVAL_PATH.value is not None:
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, eval_path=_EVAL_PATH.value))
  if not config.data.has_eval:
    raise ValueError(f"--workdir={workdir}: the run has no eval split (data.eval_path is empty): pass --eval_path")
  evaluation = pipeline.load_source(config, "eval")
  count = len(evaluation) if not _MAX_EVAL.value else min(_MAX_EVAL.value, len(evaluation))
  report_path = os.path.join(workdir, "length_eval.json")
  settings = {"eval_path": config.data.eval_path, "records": count, "grouping": _GROUPING.value,
              "samples_per_prompt": _SAMPLES.value, "cell_separator": _CELLS.value, "tokenizer": _TOKENIZER.value,
              "bootstrap_seed": _BOOTSTRAP_SEED.value}
  if _REUSE.value and os.path.isfile(report_path):
    with open(report_path, encoding="utf-8") as f:
      earlier = json.load(f)
    if earlier.get("checkpoint_step") == predictor.step and earlier.get("settings") == settings:
      print(f"--reuse: {report_path} holds this evaluation of step {predictor.step}")
      return earlier
  if count == 0:  # Before any work; an earlier report stays (files.write_report refuses 0 items too).
    files.write_report(report_path, "", items=0, what="eval records", where=f"--workdir={workdir}")
  # What the run's data settings cut from both splits, and how unfinished completions were treated: one line each.
  cuts = {"train": cut_report.count(train, config.data, "train"),
          "eval": cut_report.count(evaluation, config.data, "eval", limit=0)}
  unfinished = sum(not evaluation[i].finished for i in range(count))
  print(f"data.unfinished={config.data.unfinished} in training; held-out: {unfinished} of {count} eval records are "
        "unfinished (no EOS, length unknown): left out of the per-token metrics")
  for report in cuts.values():
    print(report.line())
  describe = prompt_describer(config)
  baselines = length_eval.fit_baselines([train[i] for i in range(len(train))], config.loss.gamma, describe)
  report = length_eval.evaluate(predictor, [evaluation[i] for i in range(count)], baselines, config.loss.gamma,
                                config.data.max_len, _BATCH.value, config.data.max_prompt_len,
                                cell_of=functools.partial(prompt_groups.cell_of, separator=_CELLS.value)
                                if _CELLS.value else None, grouping=_GROUPING.value,
                                samples_per_prompt=_SAMPLES.value, describe=describe,
                                bootstrap_seed=_BOOTSTRAP_SEED.value)
  report["checkpoint_step"] = predictor.step
  report["settings"] = settings
  report["unfinished_policy"] = config.data.unfinished
  report["prompt_cut"] = config.data.prompt_cut
  report["data_cuts"] = {split: cut.to_dict() for split, cut in cuts.items()}
  files.write_report(report_path, json.dumps(report, indent=2), items=count, what="eval records",
                     where=f"--workdir={workdir}")
  return report


if __name__ == "__main__":
  cli.run(main)
