"""Launch experiments.train (one job per sweep point) with XManager: locally, on Vertex AI, or on GKE TPUs.

Runs in its own venv (xmanager pins clash with nothing, but it is large):
  python -m venv .venv-launch && .venv-launch/bin/pip install -r launch/requirements.txt
  .venv-launch/bin/python launch/xm_launch.py --config=experiments/configs/synthetic.py \
      --executor=vertex --accelerator=A100 --accelerator_count=8 --workdir_root=gs://bucket/runs \
      --sweep=config.loss.gamma=0.99,0.997 [--zip] --dry_run

--dry_run prints each job's spec (image build steps, executor, requirements, trainer flags) as JSON and contacts
nothing. The trainer writes its workdir with local file I/O: on Vertex AI a gs://BUCKET/... root is passed as
/gcs/BUCKET/... (Vertex mounts buckets there); for GKE pass the path where the bucket is mounted (GCS FUSE CSI).
Sweep specs are parsed by lenvm_jax/sweep_spec.py, the same parser experiments/sweep.py uses.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script: find `launch`.

from launch import repo  # noqa: E402  pylint: disable=g-import-not-at-top
from lenvm_jax.run.workdir_checks import is_url  # noqa: E402  pylint: disable=g-import-not-at-top
from lenvm_jax import sweep_spec  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = repo.REPO

EXECUTORS = ("local", "vertex", "gke")
GPUS = ("T4", "L4", "V100", "P100", "A100", "A100_80GIB", "H100", "H200", "B200")
TPUS = ("TPU_V4", "TPU_V5E", "TPU_V5P", "TPU_V6E")

_CONFIG = flags.DEFINE_string("config", None, "Trainer config file, relative to the repo root.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "config.<field>=<v1>,<v2>,... (repeat for more axes).")
_ZIP = flags.DEFINE_bool("zip", False, "Pair the sweep axes' values in order instead of taking their product.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", EXECUTORS, "local (Docker here), vertex (Vertex AI), gke (TPUs).")
_ACCELERATOR = flags.DEFINE_enum("accelerator", None, GPUS + TPUS, "Accelerator type; none = CPU.")
_ACCELERATOR_COUNT = flags.DEFINE_integer("accelerator_count", 1, "GPUs per job (GPU accelerators).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. 2x2x1 (v4/v5p) or 4x4 (v5e/v6e).")
_TPU_RUNTIME = flags.DEFINE_string("tpu_runtime_version", "tpu-ubuntu2204-base",
                                   "TPU software version (gke executor).")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11-slim", "Docker base image.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "runs",
                                    "Parent of the jobs' workdirs: a path in the job's file system, or gs://BUCKET/... "
                                    "with --executor=vertex (passed to the trainer as /gcs/BUCKET/..., the bucket's "
                                    "Cloud Storage FUSE mount).")
_TITLE = flags.DEFINE_string("experiment_title", "lenvm", "Experiment title (also the workdir folder).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job specs as JSON; contact nothing.")
flags.mark_flags_as_required(["config"])


def docker_instructions(accelerator: str | None) -> list[str]:
  """Image build steps: pinned requirements, then the accelerator's jax build (CUDA or TPU) at the same version."""
  name = os.path.basename(REPO)
  steps = ["ENV LANG=C.UTF-8", "RUN mkdir -p /workdir", "WORKDIR /workdir",
           f"COPY {name}/requirements.txt /workdir/requirements.txt",
           "RUN python -m pip install -r requirements.txt"]
  if accelerator in GPUS:
    steps.append(f"RUN python -m pip install 'jax[cuda12]=={repo.jax_version()}'")
  elif accelerator in TPUS:
    steps.append(f"RUN python -m pip install 'jax[tpu]=={repo.jax_version()}'")
  return steps + [f"COPY {name}/ /workdir"]


def requirements_kwargs(accelerator: str | None, count: int, topology: str | None) -> dict:
  """xm.JobRequirements keywords: GPUs by count, TPUs by topology (e.g. tpu_v4='2x2x1')."""
  if accelerator is None:
    if topology:
      raise app.UsageError("--topology needs a TPU --accelerator")
    return {}
  if accelerator in TPUS:
    if not topology:
      raise app.UsageError(f"--accelerator={accelerator} needs --topology (e.g. 2x2x1)")
    return {accelerator.lower(): topology}
  if topology:
    raise app.UsageError(f"--topology is for TPUs; {accelerator} takes --accelerator_count")
  if count < 1:
    raise app.UsageError(f"--accelerator_count must be >= 1, got {count}")
  return {accelerator.lower(): count}


def workdir_root() -> str:
  """The jobs' workdir parent as the trainer sees it. The trainer writes local paths only; Vertex AI mounts the
  buckets a job can reach at /gcs/<bucket> (Cloud Storage FUSE), so gs://B/p becomes /gcs/B/p there."""
  root = _WORKDIR_ROOT.value.rstrip("/")
  if not is_url(root):
    return root
  if _EXECUTOR.value == "vertex" and root.startswith("gs://"):
    return "/gcs/" + root[len("gs://"):]
  raise app.UsageError(f"--workdir_root {root!r}: the trainer writes local paths; a gs:// root works with "
                       "--executor=vertex (mounted at /gcs/); otherwise pass a path where the bucket is mounted")


def job_args(config: str, point: dict, name: str) -> dict:
  """The trainer's flags for one point: config, its own workdir, and the point's overrides."""
  args = {"config": config, "workdir": f"{workdir_root()}/{_TITLE.value}/{name}"}
  args.update({key: value for key, value in point.items()})
  return args


def build(xm, xm_local, config: str, named_points):
  """The XManager objects: one executable spec, one executor, and a job per sweep point."""
  executable_spec = xm.PythonContainer(path=REPO, base_image=_BASE_IMAGE.value,
                                       entrypoint=xm.ModuleName("experiments.train"),
                                       docker_instructions=docker_instructions(_ACCELERATOR.value))
  requirements = xm.JobRequirements(**requirements_kwargs(_ACCELERATOR.value, _ACCELERATOR_COUNT.value,
                                                          _TOPOLOGY.value))
  if _EXECUTOR.value == "local":
    executor = xm_local.Local(requirements=requirements)
  elif _EXECUTOR.value == "vertex":
    executor = xm_local.Vertex(requirements=requirements)
  else:
    tpu = xm_local.TpuCapability(tpu_runtime_version=_TPU_RUNTIME.value) if _ACCELERATOR.value in TPUS else None
    executor = xm_local.Kubernetes(requirements=requirements, tpu_capability=tpu)
  jobs = [(name, job_args(config, point, name)) for name, point in named_points]
  return executable_spec, executor, jobs


def describe(executable_spec, executor, jobs) -> list[dict]:
  """What --dry_run prints: every field a launch would use, per job."""
  resources = {str(k.name): v for k, v in executor.requirements.task_requirements.items()}
  executor_info = {"type": type(executor).__name__, "resources": resources, "topology": _TOPOLOGY.value}
  if getattr(executor, "tpu_capability", None):
    executor_info["tpu_runtime_version"] = executor.tpu_capability.tpu_runtime_version
  image = {"path": executable_spec.path, "base_image": executable_spec.base_image,
           "entrypoint": executable_spec.entrypoint.module_name,
           "docker_instructions": executable_spec.docker_instructions}
  return [{"name": name, "executable": image, "executor": executor_info, "args": args,
           "command": ["python", "-m", "experiments.train"] + [f"--{k}={v}" for k, v in args.items()]}
          for name, args in jobs]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = repo.config_path(_CONFIG.value)
    named = sweep_spec.named_points(_SWEEP.value, _ZIP.value)
  except ValueError as e:  # SweepError is a ValueError.
    raise app.UsageError(str(e)) from None
  workdir_root()  # Checked before the slow xmanager import.
  from xmanager import xm, xm_local  # pylint: disable=g-import-not-at-top  (slow import, only after flag checks)

  executable_spec, executor, jobs = build(xm, xm_local, config, named)
  if _DRY_RUN.value:
    print(json.dumps(describe(executable_spec, executor, jobs), indent=2))
    return
  with xm_local.create_experiment(experiment_title=_TITLE.value) as experiment:
    [executable] = experiment.package([xm.Packageable(executable_spec=executable_spec,
                                                      executor_spec=type(executor).Spec())])
    for _, args in jobs:
      experiment.add(xm.Job(executable=executable, executor=executor, args=args))


if __name__ == "__main__":
  app.run(main)
