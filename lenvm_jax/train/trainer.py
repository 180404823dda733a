"""The training loop: config -> mesh -> state (fresh or resumed) -> compiled step -> log / eval / checkpoint.

Resume is exact: the checkpoint holds params, optimizer state, step, RNG and the grain iterator position, so a
rerun of the same command continues the same sequence of batches and updates, from the newest checkpoint that
restores intact (train/checkpointing.py).

Fail safe: the workdir is locked first (a second trainer refuses); then data, mesh and state are set up, and any
user mistake among them (config, data, paths, devices, a checkpoint of another model) raises a UserError before the
workdir changes; config.json is written only once all of that has worked (config_history.write_config keeps a config that a
resume replaced).

One readable trainer in one file, as big_vision's: the loop and its setup read top to bottom (~400 lines).
"""

import contextlib
import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lenvm_jax import config as config_lib, distributed, errors, progress as progress_lib, sharding
from lenvm_jax.run import config_history, eos as run_eos, workdir_checks, workdir_lock
from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import cut_report, pipeline, records
from lenvm_jax.model import hf_import
from lenvm_jax.train import checkpointing, feature_cache, program as program_lib, state as state_lib
from lenvm_jax.train import metrics_log
from lenvm_jax.train.metrics_log import MetricsLog
from lenvm_jax.value import gamma as gamma_lib, metrics


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
  """One train record from a window's sums: loss and grad_norm averaged over its finite steps, the metrics of
  docs/method.md §8 as token means over all of its batches (metrics.finalize). All NaN if every step of the window
  was skipped."""
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


@jax.jit
def _streak(streak, longest, finite):
  """Non-finite steps in a row (0 after a finite one) and the longest such run since the last check, on device."""
  streak = jnp.where(finite, 0, streak + 1)
  return streak, jnp.maximum(longest, streak)


def _on_nonfinite(run: RunConfig, step: int, new_skips: int, last_step_finite: bool, longest_streak: int):
  message = (f"non-finite loss or gradient: {new_skips} update(s) skipped up to step {step} "
             f"(the last step was {'finite' if last_step_finite else 'non-finite'})")
  if run.train.nonfinite == "stop":
    raise errors.NonFiniteError(message + "; stopping (train.nonfinite='stop'); the last checkpoint is intact")
  limit = run.train.max_nonfinite_streak
  if limit and longest_streak >= limit:
    raise errors.NonFiniteError(
        f"{message}: {longest_streak} steps in a row (config.train.max_nonfinite_streak={limit}); the run diverged "
        "and stops, the last checkpoint is intact; resume with a smaller config.optim.lr or check the data")
  logging.warning("%s; continuing (train.nonfinite='skip')", message)


def _params_from_hf(directory: str, model_config, mesh, seed: int) -> dict:
  """model.init_from: the HF checkpoint's weights, after checking that its architecture is the run's."""
  try:
    hf_import.check_run_matches(model_config, directory)
  except (ValueError, OSError) as e:
    raise config_lib.ConfigError(f"config.model.init_from={directory!r}: {e}") from None
  logging.info("initialising from the Hugging Face checkpoint %s%s", directory,
               "" if hf_import.has_value_head(directory) else " (no value_head.safetensors: fresh value head)")
  return hf_import.load_params(directory, model_config, mesh, seed)


def _data_field(run: RunConfig, split: str) -> str:
  if run.data.source == "synthetic":
    return "data.synthetic"
  if run.data.source == "tfds":
    return "data.tfds_data_dir"
  return "data.train_path" if split == "train" else "data.eval_path"


def check_held_out(run: RunConfig):
  """An eval split that is the training split would report training error as held-out error, silently."""
  data = run.data
  if data.source in ("jsonl", "arrayrecord") and data.eval_path:
    same = data.eval_path == data.train_path or (os.path.exists(data.eval_path) and os.path.exists(data.train_path)
                                                 and os.path.samefile(data.eval_path, data.train_path))
    if same:
      raise ConfigError(f"config.data.eval_path: is the training split ({data.train_path!r}); give a held-out split "
                        "(prepare_data writes <dir>/eval, carve_validation a validation split) or leave it empty")


def load_split(run: RunConfig, split: str):
  """pipeline.load_source, with a path that cannot be read as a ConfigError naming its field."""
  try:
    return pipeline.load_source(run, split)
  except OSError as e:
    path = run.data.train_path if split == "train" else run.data.eval_path
    reason = f"{e.strerror.lower()}: {path!r}" if e.strerror else str(e)
    raise ConfigError(f"config.{_data_field(run, split)}: cannot read it ({reason}); check the path") from None


# Records read before training to check that rows can be built from them (the rest fail inside the pipeline).
_CHECKED_RECORDS = 256


def check_trainable(run: RunConfig, source, split: str):
  """Refuses a split from which no row can be built, before the grain pipeline would wait for one forever: no
  records, only unfinished ones under data.unfinished='drop' (in this host's share for training), or prompts that
  leave data.max_len no room."""
  field = _data_field(run, split)
  data = run.data
  count = len(source)
  indices = range(jax.process_index(), count, jax.process_count()) if split == "train" else range(count)
  if not len(indices):
    raise ConfigError(f"config.{field}: the {split} split holds {count} records"
                      + (f", none for process {jax.process_index()} of {jax.process_count()}" if count else ""))
  if data.source == "synthetic" and not data.max_prompt_len:
    longest = pipeline.synthetic_policy(run).max_prompt_len
    if problem := records.prompt_too_long(longest, data.max_len):
      raise ConfigError(f"config.data.max_len: synthetic prompts have up to {longest} tokens: {problem}")
  found_finished = data.unfinished != "drop"
  for checked, index in enumerate(indices):
    trajectory = source[index]
    if checked < _CHECKED_RECORDS and not data.max_prompt_len:
      if problem := records.prompt_too_long(len(trajectory.prompt_ids), data.max_len):
        raise ConfigError(f"config.data.max_len: {split} record {index}: {problem}")
    found_finished = found_finished or trajectory.finished
    if found_finished and checked >= _CHECKED_RECORDS:
      break
  if not found_finished:
    raise ConfigError(f"config.data.unfinished: all {len(indices)} {split} records"
                      f"{' of this process' if split == 'train' and jax.process_count() > 1 else ''} are unfinished "
                      f"(no EOS) and data.unfinished='drop' leaves none to {'train' if split == 'train' else 'eval'} "
                      "on; set data.unfinished='as_finished' or 'infinite', or use finished completions")


# Synthetic records are drawn (with exact values) when read: count the cuts on this many spread over the split.
_SYNTHETIC_CUT_COUNT = 1000


def report_cuts(run: RunConfig, train_source, eval_source) -> dict:
  """{split: CutReport}: what data.max_prompt_len / prompt_cut, data.max_len and data.unfinished cut or drop from
  each split (data/cut_report.py), said as one line each, so that no cut is silent; data.prompt_cut='refuse' raises
  here for the first long prompt."""
  limit = _SYNTHETIC_CUT_COUNT if run.data.source == "synthetic" else cut_report.COUNT_LIMIT
  cuts = {}
  for split, source in (("train", train_source), ("eval", eval_source)):
    if source is not None:
      cuts[split] = report = cut_report.count(source, run.data, split, limit)
      counts = report.to_dict()
      anything = counts["prompts_cut"] or counts["rows_cut"] or counts["unfinished"]
      (logging.warning if anything else logging.info)("data %s", report.line())
  return cuts


def size_by_epochs(run: RunConfig, train_cuts: cut_report.CutReport) -> tuple[RunConfig, float]:
  """(run with train.steps derived from train.epochs when that is set, passes over the training data per step)."""
  rows_open = run.train.batch_size // jax.process_count()
  per_step = run.train.batch_size * cut_report.records_per_row(train_cuts, run.data, rows_open)
  passes_per_step = per_step / max(train_cuts.kept, 1)
  if not run.train.epochs:
    return run, passes_per_step
  steps = cut_report.steps_for_epochs(run.train.epochs, train_cuts, run.data, run.train.batch_size, rows_open)
  logging.info("train.epochs=%g: %d steps of %.1f records over %d training records (train.steps in config.json)",
               run.train.epochs, steps, per_step, train_cuts.kept)
  return dataclasses.replace(run, train=dataclasses.replace(run.train, steps=steps, epochs=0.0)), passes_per_step


def resolve_gamma(run: RunConfig):
  """(run with loss.gamma a number, its training source): "auto" / "auto_mre" are resolved from the training split's
  lengths (value/gamma.py), read once, before anything else is built."""
  source = load_split(run, "train")
  if run.loss.resolved:
    return run, source
  run = gamma_lib.resolve(run, pipeline.length_sample(source))
  if run.data.source == "synthetic":  # Synthetic records carry their exact values under gamma: draw them again.
    source = load_split(run, "train")
  return run, source


def make_mesh(run: RunConfig):
  try:
    return sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
  except ValueError as e:  # More devices than there are, or sizes that do not divide them.
    raise ConfigError(f"config.mesh: {e}") from None


def _disk_failure(error: BaseException, workdir: str, ckpt) -> errors.UserError | None:
  """A write that failed for the disk (full, read-only, permissions) as one line that says where to resume."""
  if isinstance(error, errors.UserError):
    return None
  reason = errors.os_error_reason(error)
  if reason is None:
    return None
  done = ckpt.steps()
  resume = f"it resumes from step {done[-1]}" if done else "it starts afresh (no complete checkpoint yet)"
  return errors.UserError.at(f"cannot write the run: {reason}", getattr(error, "filename", None) or workdir,
                             errors.rerun_advice(error, resume))


def train_and_evaluate(run: RunConfig, workdir: str) -> dict:
  """Trains to run.train.steps (resuming from the newest intact checkpoint in workdir); returns the last eval
  metrics."""
  workdir_checks.check_workdir(workdir)
  workdir_checks.make_workdir(workdir)
  with workdir_lock.WorkdirLock(workdir) if distributed.is_leader() else contextlib.nullcontext():
    if distributed.is_leader():
      metrics_log.check_workdir_files(workdir)  # A link planted for the logs is refused before any work.
    run, train_source = resolve_gamma(run)
    mesh = make_mesh(run)
    config_lib.check_batch_fits_mesh(run, mesh, jax.process_count())
    check_trainable(run, train_source, "train")
    record = run_eos.record(run, train_source)  # The run's EOS ids and tokenizer, kept in its config.json.
    check_held_out(run)
    eval_source = load_split(run, "eval") if run.data.has_eval else None
    if eval_source is not None:
      check_trainable(run, eval_source, "eval")
    cuts = report_cuts(run, train_source, eval_source)
    run, passes_per_step = size_by_epochs(run, cuts["train"])
    logging.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())
    features = feature_cache.for_run(run, workdir, train_source)  # Checked and built once the weights exist.
    train_iter = iter(pipeline.train_dataset(run, train_source, features and features.reader))
    ckpt = checkpointing.Checkpointer(workdir, run.checkpoint.every_steps, run.checkpoint.keep,
                                      run.checkpoint.async_save, run.checkpoint.keep_best)
    failed = True
    try:
      with jax.set_mesh(mesh):
        last_eval = _train(run, workdir, mesh, train_iter, eval_source, ckpt, features, cuts=cuts,
                           passes_per_step=passes_per_step, record=record)
      failed = False
      return last_eval
    except Exception as e:  # pylint: disable=broad-except
      if (failure := _disk_failure(e, workdir, ckpt)) is not None:
        raise failure from None
      raise
    finally:
      if features is not None:
        features.reader.release()  # Prefetch threads waiting for a cache that the run never made ready stop.
      if hasattr(train_iter, "close"):
        train_iter.close()  # Stops grain worker processes.
      try:
        ckpt.close()
      except Exception:  # pylint: disable=broad-except
        if not failed:
          raise
        logging.warning("the last checkpoint save did not complete either")  # The first failure is the one raised.


def _train(run: RunConfig, workdir: str, mesh, train_iter, eval_source, ckpt, features=None, *, cuts=None,
           passes_per_step: float = 0.0, record: dict | None = None) -> dict:
  """State (restored or fresh) -> compiled steps -> config.json and the metrics log -> the loop."""
  model_config = run.model
  program, state = program_lib.build(run, mesh, initialize=False)  # The restore target.
  objective = program.objective
  resume_step, restored = ckpt.restore_newest(state, train_iter, run)
  if resume_step is None:
    initial_params = None
    if model_config.init_from:  # A resumed run takes its weights from the checkpoint.
      initial_params = _params_from_hf(model_config.init_from, model_config, mesh, run.seed)
    state = program.fresh_state(initial_params)
  else:
    state = restored
  if features is not None:  # The frozen weights are known now: check the cache against them, or build it.
    features.ready(state.params, mesh)

  first = next(train_iter)
  to_micro = program.micro_batches
  train_sh = program.train_batch_shardings(to_micro(first))
  eval_rows = run.train.eval_batch_size // jax.process_count()
  eval_example = {k: np.zeros((eval_rows,) + v.shape[1:], v.dtype) for k, v in first.items()  # Also the pad.
                  if k != pipeline.FEATURES}  # Eval runs the whole trunk.
  eval_sh = program.eval_batch_shardings(eval_example)
  compiled_train, compiled_eval = program.compile_steps(
      state_lib.shape_structs(state), train_sh, eval_sh,
      train_batch_shape=_global_shapes(to_micro(first), train_sh, leading=1),
      eval_batch_shape=_global_shapes(eval_example, eval_sh, leading=0))
  # Per device, every scan (layers, micro-batches) multiplied out: the compiled step's own count has each once.
  flops_per_step = program.train_step_flops(state_lib.shape_structs(state),
                                            _global_shapes(to_micro(first), train_sh, leading=1)) / mesh.size
  has_eval = eval_source is not None
  evaluate_state = lambda s: evaluate(compiled_eval, state_lib.eval_params(s), objective, run, eval_source,
                                      eval_sh, eval_example)

  # The run has started cleanly: from here on the workdir records it.
  if distributed.is_leader():
    config_history.write_config(workdir, run, resume_step, record)
  log = MetricsLog(workdir)
  step = int(state.step)
  for split, report in (cuts or {}).items():  # What the data settings cut or dropped: data_train, data_eval.
    log.write(step, f"data_{split}", report.to_dict())
  reported_skips = int(state.nonfinite_skips)
  streak = longest_streak = jnp.zeros((), jnp.int32)
  stop = _StopRequest()
  progress = progress_lib.ProgressLine("train", run.train.steps, start=step)  # The console's line (metrics: log).
  last_eval: dict = {}
  stopped = False
  window_start, window_tokens, window_steps, window = time.perf_counter(), 0.0, 0, None
  batch = first
  try:
    while step < run.train.steps:
      state, step_metrics = compiled_train(state, _global_batch(to_micro(batch), train_sh))
      window = _add_to_window(window, step_metrics)
      streak, longest_streak = _streak(streak, longest_streak, step_metrics["finite"])
      step += 1
      window_steps += 1
      window_tokens += float(np.count_nonzero(batch["segment_ids"])) * jax.process_count()  # Non-pad tokens.
      if step % run.train.log_every == 0 or step == run.train.steps:
        train_metrics = _window_metrics(window)
        elapsed = time.perf_counter() - window_start
        finite = bool(jax.device_get(step_metrics["finite"]))
        skips = int(state.nonfinite_skips)
        train_metrics.update(tokens_per_s=window_tokens / elapsed,
                             flops_per_s=flops_per_step * window_steps / elapsed, nonfinite_skips=skips,
                             epochs=step * passes_per_step)
        log.write(step, "train", train_metrics)
        progress.update(step, loss=train_metrics["loss"], **{"tokens/s": train_metrics["tokens_per_s"],
                                                              "passes": step * passes_per_step})
        window_start, window_tokens, window_steps, window = time.perf_counter(), 0.0, 0, None
        if skips > reported_skips:
          _on_nonfinite(run, step, skips - reported_skips, finite, int(longest_streak))
          reported_skips = skips
        longest_streak = streak
      else:
        progress.update(step, show=progress.in_place)  # A terminal's line counts every step.
      step_eval = None
      if has_eval and run.train.eval_every and step % run.train.eval_every == 0 and step < run.train.steps:
        eval_start = time.perf_counter()
        last_eval = step_eval = evaluate_state(state)
        log.write(step, "eval", last_eval)
        window_start += time.perf_counter() - eval_start  # Eval time is not training throughput.
      if step < run.train.steps:  # The last step is saved below, after the final eval.
        if ckpt.due(step, step_eval) and int(streak):  # A non-finite step is never what a checkpoint holds.
          logging.warning("checkpoint step %d not saved: its step was non-finite (%d in a row); the next due step "
                          "is saved", step, int(streak))
        else:
          ckpt.save(step, state, train_iter, metrics=step_eval)  # After the eval: checkpoint.keep_best ranks by it.
        ckpt.poll()
      # Every host must leave the loop at the same step. Agreeing takes a cross-host all-gather, which would stall
      # dispatch if done every step, so several hosts agree only at log steps (where they sync anyway).
      at_log_step = step % run.train.log_every == 0 or step == run.train.steps
      if (jax.process_count() == 1 or at_log_step) and distributed.any_host(stop.signal is not None):
        logging.warning("%s received: checkpointing step %d and exiting", stop.signal or "stop on another host", step)
        stopped = True
        break
      if step < run.train.steps:
        batch = next(train_iter)
    step_eval = None
    if not stopped and has_eval:
      last_eval = step_eval = evaluate_state(state)
      log.write(step, "eval", last_eval)
    if int(streak):
      done = ckpt.steps()
      raise errors.NonFiniteError(
          f"the run ended on {int(streak)} non-finite step(s) in a row (step {step}): its state is not checkpointed; "
          + (f"the last checkpoint, step {done[-1]}, is intact" if done else "no checkpoint was written")
          + "; resume with a smaller config.optim.lr or check the data")
    ckpt.save(step, state, train_iter, force=True, metrics=step_eval)
    ckpt.wait()
    logging.info("trained %d steps: %.2f passes over the training data", step, step * passes_per_step)
  finally:
    stop.restore()
    progress.close()
    log.close()
  return last_eval
