"""Train a Length Value Model.

  python -m experiments.train --config experiments/configs/synthetic.py --workdir runs/synthetic \
      [--config.train.steps=500 ...]

Rerunning the same command on a workdir with checkpoints resumes exactly where it stopped.

Multi-host: run the same command on every host. On Cloud TPU VMs, SLURM, Open MPI or Kubernetes, JAX finds the
other processes itself (--distributed=auto); elsewhere pass --coordinator_address=host0:port --num_processes=N
--process_id=i. The workdir must be storage that all hosts see (checkpoints are written by all of them).
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from lenvm_jax import distributed
from lenvm_jax.config import RunConfig
from lenvm_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/*.py).",
                                          lock_config=True)
_RUN = cli.run_flags("Output directory: checkpoints, metrics.jsonl, TensorBoard, config.", step=False)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                  "Start jax.distributed: auto = when a coordinator is given or a cluster is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  trainer.train_and_evaluate(RunConfig.from_dict(_CONFIG.value), _RUN.workdir.value)  # User errors: cli.run's line.


if __name__ == "__main__":
  cli.run(main)
