"""Multi-process runs: when to start JAX's distributed runtime, and keeping hosts in step over uneven data.

One process per host (TPU VM worker, GPU node, or a local process in tests) runs the same trainer; after
`jax.distributed.initialize` the mesh spans every process's devices, each host feeds its own slice of the data
(`data/pipeline.py` slices by `jax.process_index()`), orbax writes checkpoints from all hosts together, and only
process 0 writes metrics files.
"""

import os
from typing import Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")


def _cluster_detected() -> str | None:
  """Name of the cluster environment (Cloud TPU VM, SLURM, Open MPI, Kubernetes) that JAX would bootstrap from.

  This asks JAX's own detectors (the ones `jax.distributed.initialize()` uses with no arguments), skipping opt-in
  ones (mpi4py), so "auto" starts the runtime exactly where JAX can configure it itself.
  """
  try:
    from jax._src.clusters import ClusterEnv  # pylint: disable=g-import-not-at-top
  except ImportError:  # A private module: if JAX moves it, auto-detection falls back to explicit settings only.
    logging.warning("jax._src.clusters not found: multi-host auto-detection is off; pass --coordinator_address")
    return None
  for env in ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.__name__
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when the run has several processes; returns whether it did.

  mode "on" always initializes (arguments left None are auto-detected by JAX), "off" never does, and "auto" does
  when a coordinator address is given (argument or JAX_COORDINATOR_ADDRESS) or JAX detects a cluster environment.
  Must run before anything touches a JAX device.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
  if mode == "off" or jax.distributed.is_initialized():
    return False
  explicit = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if mode == "auto" and not explicit:
    cluster = _cluster_detected()
    if cluster is None:
      return False
    logging.info("multi-host: %s detected", cluster)
  if coordinator_address and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("multi-host: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_leader() -> bool:
  """Process 0 writes the files every host would otherwise write the same (metrics, TensorBoard, config)."""
  return jax.process_index() == 0


def aligned_batches(batches: Iterable[dict], empty: dict) -> Iterator[dict]:
  """This host's batches, then `empty` until every host has run out: all hosts make the same number of calls.

  Hosts' eval slices can yield different batch counts (uneven splits, dropped or packed records), and a compiled
  step that spans hosts must be entered by all of them. `empty` has no valid tokens, so it adds nothing to sums.
  One tiny all-gather per batch decides when the pass ends.
  """
  iterator = iter(batches)
  while True:
    batch = next(iterator, None)
    if jax.process_count() > 1:
      has_batch = multihost_utils.process_allgather(np.int32(batch is not None))
      if not np.any(has_batch):
        return
    elif batch is None:
      return
    yield empty if batch is None else batch


def any_host(flag: bool) -> bool:
  """True on every host when `flag` is true on any (e.g. a stop signal that reached only some hosts)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
