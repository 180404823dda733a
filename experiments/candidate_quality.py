"""Quality of the two candidate scorers on a synthetic run: MSE of V(s_t + x) against the exact value, every token x.

  python -m experiments.candidate_quality --workdir runs/synthetic_candidate [--trajectories=256]

For the run's eval trajectories (cut at data.max_len) and every non-terminal state, each scorer values all tokens of
the vocabulary as the next one (lenvm_jax/evaluation/candidate_quality.py): next_state runs them through the trunk,
candidate_head reads them off the state's hidden vector (a run trained with loss.candidate_weight > 0). Prints the
MSE per token class and writes <workdir>/candidate_quality.json.
"""

import json
import os

from absl import app, flags

from experiments import cli
from lenvm_jax.data import pipeline
from lenvm_jax.evaluation import candidate_quality

_RUN = cli.run_flags("Training workdir of a synthetic run (config.json + checkpoints).", step=False)
_TRAJECTORIES = flags.DEFINE_integer("trajectories", 256, "Eval trajectories to score.")
_SCORERS = flags.DEFINE_list("scorer", ["next_state", "candidate_head"], "Scorers to compare.")
_BATCH = cli.batch_size_flag(16)


def format_report(report: dict) -> str:
  classes = candidate_quality.TOKEN_CLASSES + ("realised",)
  lines = [f"checkpoint {report['checkpoint_step']}, {report['trajectories']} eval trajectories, "
           f"{report['states']} non-terminal states x {report['vocab_size']} tokens",
           "MSE of V(s_t + x) vs exact " + "".join(f"{c:>14}" for c in classes)]
  scorers = [s for s in report if isinstance(report[s], dict)]
  for scorer in scorers:
    lines.append(f"{scorer:<27}" + "".join(f"{report[scorer][c]:14.3e}" for c in classes))
  if {"next_state", "candidate_head"} <= set(scorers):
    lines.append(f"{'candidate / next_state':<27}" + "".join(
        f"{report['candidate_head'][c] / max(report['next_state'][c], 1e-30):14.2f}" for c in classes))
  return "\n".join(lines)


def main(argv):
  del argv
  predictor = cli.load_predictor(_RUN)
  config = predictor.config
  if config.data.source != "synthetic":
    raise app.UsageError(f"{_RUN.workdir.value}: not a synthetic run (data.source={config.data.source!r}); exact values "
                         "are known only for the synthetic generator")
  source = pipeline.load_source(config, "eval")
  trajectories = [source[i] for i in range(min(_TRAJECTORIES.value, len(source)))]
  report = {"checkpoint_step": predictor.step, "trajectories": len(trajectories),
            **candidate_quality.evaluate(predictor, pipeline.synthetic_policy(config), trajectories,
                                         tuple(_SCORERS.value), _BATCH.value)}
  path = os.path.join(_RUN.workdir.value, "candidate_quality.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(format_report(report))
  print(f"report in {path}")


if __name__ == "__main__":
  cli.run(main)
