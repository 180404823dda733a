"""The training loop: config -> mesh -> state (fresh or resumed) -> compiled step -> log / eval / checkpoint.

Resume is exact: the checkpoint holds params, optimizer state, step, RNG and the grain iterator position, so a
rerun of the same command continues the same sequence of batches and updates.
"""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lenvm_jax import config as config_lib, distributed, rundir, sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.model import hf_config, hf_import, transformer
from lenvm_jax.train import checkpointing, optimizer, state as state_lib, step as step_lib
from lenvm_jax.train.metrics_log import MetricsLog
from lenvm_jax.value import gamma as gamma_lib, metrics
from lenvm_jax.value.objective import Objective


class _StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

  def __init__(self):
    self.signal = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _global_batch(local: dict, shardings: dict):
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def evaluate(compiled_eval, params, objective, run: RunConfig, eval_source, shardings, empty: dict) -> dict:
  """One pass over the eval split: the training objective (`loss`) and the metrics, from exact sums.

  `empty` (a batch without valid tokens) pads hosts that run out of eval batches early, so all take the same steps.
  """
  totals: dict = {}
  for batch in distributed.aligned_batches(pipeline.eval_batches(run, eval_source), empty):
    sums = jax.device_get(compiled_eval(params, _global_batch(batch, shardings)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  pieces = {k.split("/", 1)[1]: totals.pop(k) for k in list(totals) if k.startswith("objective/")}
  loss = objective.loss(pieces, pieces.pop("value_count"), pieces.pop("lm_count"),
                        pieces.pop("candidate_count", None))
  return {"loss": float(loss), **metrics.finalize(totals)}


@jax.jit
def _add_to_window(window, step_metrics):
  """Train metrics summed over the steps since the last log record, finite steps only: a skipped step's metrics are
  NaN and are reported through the skip counter instead. window=None starts a new window."""
  finite = step_metrics["finite"]
  kept = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in step_metrics.items() if k != "finite"}
  kept["finite_steps"] = finite.astype(jnp.float32)
  return kept if window is None else jax.tree.map(jnp.add, window, kept)


def _window_metrics(window) -> dict:
  """One train record from a window's sums: loss and grad_norm averaged over its finite steps, the spec metrics as
  token means over all of its batches (metrics.finalize). All NaN if every step of the window was skipped."""
  values = jax.device_get(window)
  steps = float(values.pop("finite_steps"))
  out = {name: float(values.pop(name)) / max(steps, 1.0) for name in ("loss", "grad_norm")}
  out.update(metrics.finalize(values))
  return out if steps else {name: float("nan") for name in out}


def _global_shapes(local: dict, shardings: dict, leading: int) -> dict:
  """ShapeDtypeStructs of the global arrays that hosts' local batches form (leading dim x process count)."""
  def one(x, s):
    shape = list(x.shape)
    shape[leading] *= jax.process_count()
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=s)
  return {k: one(v, shardings[k]) for k, v in local.items()}


def _on_nonfinite(run: RunConfig, step: int, new_skips: int, last_step_finite: bool):
  message = (f"non-finite loss or gradient: {new_skips} update(s) skipped up to step {step} "
             f"(the last step was {'finite' if last_step_finite else 'non-finite'})")
  if run.train.nonfinite == "stop":
    raise FloatingPointError(message + "; stopping (train.nonfinite='stop'); the last checkpoint is intact")
  logging.warning("%s; continuing (train.nonfinite='skip')", message)


def _params_from_hf(directory: str, model_config, mesh, seed: int) -> dict:
  """model.init_from: the HF checkpoint's weights, after checking that its architecture is the run's."""
  try:
    hf_config.check_run_matches(model_config, directory)
  except (ValueError, OSError) as e:
    raise config_lib.ConfigError(f"config.model.init_from={directory!r}: {e}") from None
  logging.info("initialising from the Hugging Face checkpoint %s%s", directory,
               "" if hf_import.has_value_head(directory) else " (no value_head.safetensors: fresh value head)")
  return hf_import.load_params(directory, model_config, mesh, seed)


def resolve_gamma(run: RunConfig):
  """(run with loss.gamma a number, its training source): "auto" / "auto_mre" are resolved from the training split's
  lengths (value/gamma.py), read once, before anything else is built."""
  source = pipeline.load_source(run, "train")
  if run.loss.resolved:
    return run, source
  run = gamma_lib.resolve(run, pipeline.length_sample(source))
  if run.data.source == "synthetic":  # Synthetic records carry their exact values under gamma: draw them again.
    source = pipeline.load_source(run, "train")
  return run, source


def train_and_evaluate(run: RunConfig, workdir: str) -> dict:
  """Trains to run.train.steps (resuming from the latest checkpoint in workdir); returns the last eval metrics."""
  config_lib.check_workdir(workdir)
  run, train_source = resolve_gamma(run)
  model_config = run.model
  mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
  config_lib.check_batch_fits_mesh(run, mesh, jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_leader():
    rundir.write_config(workdir, run)
  logging.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())

  objective = Objective.from_config(run.loss)
  train_iter = iter(pipeline.train_dataset(run, train_source))
  has_eval = run.data.has_eval
  eval_source = pipeline.load_source(run, "eval") if has_eval else None
  ckpt = checkpointing.Checkpointer(workdir, run.checkpoint.every_steps, run.checkpoint.keep,
                                    run.checkpoint.async_save)
  log = MetricsLog(workdir)

  with jax.set_mesh(mesh):
    graphdef, abstract = transformer.abstract_model(model_config)
    tx = optimizer.make_optimizer(run, abstract.to_pure_dict())
    resume_step = ckpt.latest_step()
    initial_params = None
    if resume_step is None and model_config.init_from:  # A resumed run takes its weights from the checkpoint.
      initial_params = _params_from_hf(model_config.init_from, model_config, mesh, run.seed)
    state, state_sh = state_lib.create_train_state(model_config, tx, mesh, run.seed,
                                                   initialize=resume_step is None, initial_params=initial_params,
                                                   ema=run.train.keeps_ema)
    if resume_step is not None:
      logging.info("resuming from %s/%d", ckpt.directory, resume_step)
      state = ckpt.restore_train_state(resume_step, state, train_iter)

    accum = run.train.accum_steps
    first = next(train_iter)
    to_micro = lambda b: {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in b.items()}
    train_sh = sharding.batch_shardings(mesh, to_micro(first), leading=1)
    eval_rows = run.train.eval_batch_size // jax.process_count()
    eval_example = {k: np.zeros((eval_rows,) + v.shape[1:], v.dtype) for k, v in first.items()}  # Also the pad.
    eval_sh = sharding.batch_shardings(mesh, eval_example, leading=0)
    compiled_train, compiled_eval = step_lib.compile_steps(
        graphdef, objective, tx, run.train, state_sh, train_sh, eval_sh, state_shape=state_lib.shape_structs(state),
        train_batch_shape=_global_shapes(to_micro(first), train_sh, leading=1),
        eval_batch_shape=_global_shapes(eval_example, eval_sh, leading=0))
    flops_per_step = float(compiled_train.cost_analysis().get("flops", 0.0))
    evaluate_state = lambda s: evaluate(compiled_eval, state_lib.eval_params(s), objective, run, eval_source,
                                        eval_sh, eval_example)

    step = int(state.step)
    reported_skips = int(state.nonfinite_skips)
    stop = _StopRequest()
    last_eval: dict = {}
    stopped = False
    window_start, window_tokens, window_steps, window = time.perf_counter(), 0.0, 0, None
    batch = first
    try:
      while step < run.train.steps:
        state, step_metrics = compiled_train(state, _global_batch(to_micro(batch), train_sh))
        window = _add_to_window(window, step_metrics)
        step += 1
        window_steps += 1
        window_tokens += float(np.count_nonzero(batch["segment_ids"])) * jax.process_count()  # Non-pad tokens.
        if step % run.train.log_every == 0 or step == run.train.steps:
          train_metrics = _window_metrics(window)
          elapsed = time.perf_counter() - window_start
          finite = bool(jax.device_get(step_metrics["finite"]))
          skips = int(state.nonfinite_skips)
          train_metrics.update(tokens_per_s=window_tokens / elapsed,
                               flops_per_s=flops_per_step * window_steps / elapsed, nonfinite_skips=skips)
          log.write(step, "train", train_metrics)
          window_start, window_tokens, window_steps, window = time.perf_counter(), 0.0, 0, None
          if skips > reported_skips:
            _on_nonfinite(run, step, skips - reported_skips, finite)
            reported_skips = skips
        ckpt.save(step, state, train_iter)
        if has_eval and run.train.eval_every and step % run.train.eval_every == 0 and step < run.train.steps:
          eval_start = time.perf_counter()
          last_eval = evaluate_state(state)
          log.write(step, "eval", last_eval)
          window_start += time.perf_counter() - eval_start  # Eval time is not training throughput.
        # Every host must leave the loop at the same step. Agreeing takes a cross-host all-gather, which would stall
        # dispatch if done every step, so several hosts agree only at log steps (where they sync anyway).
        at_log_step = step % run.train.log_every == 0 or step == run.train.steps
        if (jax.process_count() == 1 or at_log_step) and distributed.any_host(stop.signal is not None):
          logging.warning("%s received: checkpointing step %d and exiting", stop.signal or "stop on another host",
                          step)
          stopped = True
          break
        if step < run.train.steps:
          batch = next(train_iter)
      if not stopped and has_eval:
        last_eval = evaluate_state(state)
        log.write(step, "eval", last_eval)
      ckpt.save(step, state, train_iter, force=True)
      ckpt.wait()
    finally:
      stop.restore()
      if hasattr(train_iter, "close"):
        train_iter.close()  # Stops grain worker processes.
      ckpt.close()
      log.close()
  return last_eval
