"""Per-task lengths and accuracy of rollouts from a mixed reasoning-gym prompt source (experiments/smollm2_ten/README.md).

  python -m experiments.smollm2_ten.task_table --rollouts=data/smollm2_ten/rollouts

For each task (prompt id up to its first '/' or '{', evaluation/prompt_features.task_of) and split: problems, samples,
completion length p10 / p50 / p90 (tokens, cut ones at their cut length), the share cut at max_new_tokens, and the
share the task's checker accepts. Which tasks the budget curve can use (the model must solve some) and how far the
tasks' lengths differ come from this table. A one-off for that README, not part of the library.
"""

import collections
import os

import numpy as np
from absl import flags

from experiments import cli
from lenvm_jax.data import arrayrecord
from lenvm_jax.data.prompt_groups import SPLITS
from lenvm_jax.decoding.rollouts import read_records
from lenvm_jax.evaluation.prompt_features import task_of

_ROLLOUTS = flags.DEFINE_string("rollouts", "data/smollm2_ten/rollouts", "experiments.generate's output_dir.")


def main(argv):
  del argv
  print(f"{'task':<22} {'split':<6} {'problems':>8} {'samples':>8} {'p10':>5} {'p50':>5} {'p90':>5} {'cut':>6} "
        f"{'correct':>8}")
  for split in SPLITS:
    try:
      source = arrayrecord.ArrayRecordTrajectories(os.path.join(_ROLLOUTS.value, split))
    except FileNotFoundError:  # A split generate has not written yet.
      print(f"{split}: no shards yet")
      continue
    by_task = collections.defaultdict(list)
    for record in read_records(source):
      by_task[task_of(record["prompt_id"])].append(record)
    for task, records in sorted(by_task.items()):
      lengths = np.asarray([len(r["completion_ids"]) for r in records])
      cut = np.mean([not r["finished"] for r in records])
      correct = np.mean([bool(r.get("meta", {}).get("correct")) for r in records])
      p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
      print(f"{task:<22} {split:<6} {len({r['prompt_id'] for r in records}):8d} {len(records):8d} {p10:5.0f} "
            f"{p50:5.0f} {p90:5.0f} {cut:6.1%} {correct:8.1%}")


if __name__ == "__main__":
  cli.run(main)
