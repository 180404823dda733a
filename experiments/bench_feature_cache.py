"""Frozen-trunk feature cache benchmark: today's train step (the frozen layers run forward every step) against the
step on cached features (train.feature_cache='auto': only the top train.trainable_layers run), same machine, same
process, same batches.

  python -m experiments.bench_feature_cache [--trainable_layers=2 --records=32 --batch=4 --steps=2 --rounds=3]

The model is SmolLM2-135M's shape (experiments/configs/smollm2_gsm.py: 30 layers, hidden 576, vocab 49,152, float32
on CPU) with random weights (the step's cost does not depend on them) and the job's rows (data.max_len 416, packed);
the records are random tokens: a ~100-token prompt and 50 - 300 completion tokens. It builds the cache (the
frozen layers once per record, timed), then times both compiled steps in rounds that alternate them (--steps each);
the speedup is the median of the per-round ratios, printed with the lowest and highest. It also prints the first
step's loss of both (equal to the cache's bfloat16 rounding) and the cache's disk cost.
"""

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from experiments.configs import smollm2_gsm
from lenvm_jax import sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.data.records import Trajectory
from lenvm_jax.model import transformer
from lenvm_jax.train import feature_cache, optimizer, state as state_lib, step as step_lib
from lenvm_jax.value.objective import Objective

_TRAINABLE = flags.DEFINE_integer("trainable_layers", 2, "train.trainable_layers (of the model's 30).")
_RECORDS = flags.DEFINE_integer("records", 32, "Random-token records in the cache (the batches cycle over them).")
_BATCH = flags.DEFINE_integer("batch", 4, "Packed rows per step (train.batch_size; the job's 4).")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps of each kind per round (after one warm-up step each).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds, each timing --steps of today's step, then of the cached one.")
_DTYPE = flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32"], "train.feature_cache_dtype.")


def _run_config() -> RunConfig:
  config = smollm2_gsm.get_config()
  config.model.init_from = ""  # Random weights: the same cost.
  config.data.source = "arrayrecord"  # Only the row settings matter: the records come from _records().
  config.data.packing = "first_fit"
  config.train.trainable_layers = _TRAINABLE.value
  config.train.batch_size = _BATCH.value
  config.train.eval_batch_size = _BATCH.value
  config.train.feature_cache = "auto"
  config.train.feature_cache_dtype = _DTYPE.value
  config.loss.gamma = 0.99
  return RunConfig.from_dict(config)


def _records(run: RunConfig, count: int) -> list:
  rng = np.random.default_rng(0)
  vocab = run.model.vocab_size
  return [Trajectory(rng.integers(1, vocab, int(rng.integers(80, 120))).astype(np.int32),
                     rng.integers(1, vocab, int(rng.integers(50, 300))).astype(np.int32), True, f"p{i}", "random")
          for i in range(count)]


def main(argv):
  del argv
  run = _run_config()
  mesh = sharding.make_mesh(1, 1, 1)
  graphdef, abstract = transformer.abstract_model(run.model)
  tx = optimizer.make_optimizer(run, abstract.to_pure_dict())
  objective = Objective.from_config(run.loss)
  source = _records(run, _RECORDS.value)
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as workdir:
    state, _ = state_lib.create_train_state(run.model, tx, mesh, seed=0)
    frozen = step_lib.frozen_layers(run.train, state.params)
    cache = feature_cache.FeatureCache(run, workdir, source)
    start = time.perf_counter()
    cache.ready(state.params, mesh)
    build_s = time.perf_counter() - start
    manifest = feature_cache.read_manifest(cache.path)
    print(f"model: SmolLM2-135M shape, {run.model.num_layers} layers, {frozen} frozen, {run.train.trainable_layers} "
          f"trained; rows of {run.data.max_len} tokens, {run.train.batch_size} packed rows a step; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    print(f"cache: {manifest['cached_records']} records, {manifest['tokens']} tokens, {manifest['bytes'] / 1e6:.1f} MB "
          f"({manifest['bytes'] / manifest['tokens']:.0f} bytes/token, {run.train.feature_cache_dtype}), built in "
          f"{build_s:.1f} s ({manifest['tokens'] / build_s:.0f} tokens/s)")
    plain_iter = iter(pipeline.train_dataset(run, source))
    cached_iter = iter(pipeline.train_dataset(run, source, cache.reader))
    micro = lambda batch: {k: v[None] for k, v in batch.items()}  # accum_steps = 1.
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, graphdef=graphdef, objective=objective, tx=tx,
                                                    freeze_trunk=False, frozen_layers=frozen), donate_argnums=0)
    states = {"today": state, "cached": jax.tree.map(jnp.copy, state)}  # Each donated to its own steps.
    iters = {"today": plain_iter, "cached": cached_iter}
    seconds = {name: [] for name in states}
    tokens = []

    def timed(name, count):
      start = time.perf_counter()
      for _ in range(count):
        batch = next(iters[name])
        if name == "today":
          tokens.append(int(np.count_nonzero(batch["segment_ids"])))
        states[name], metrics = step(states[name], micro(batch))
      jax.block_until_ready(states[name].params)
      return (time.perf_counter() - start) / count, metrics

    first = {}
    for name in states:  # Warm-up: compiles each step, and its first loss.
      start = time.perf_counter()
      _, metrics = timed(name, 1)
      first[name] = float(metrics["loss"])
      print(f"{name}: compile + first step {time.perf_counter() - start:.1f} s, loss {first[name]:.6f}")
    for _ in range(_ROUNDS.value):
      for name in states:
        seconds[name].append(timed(name, _STEPS.value)[0])
    ratios = [a / b for a, b in zip(seconds["today"], seconds["cached"])]
    per_step = {name: statistics.median(values) for name, values in seconds.items()}
    tokens_per_step = statistics.mean(tokens)
    for name in states:
      print(f"{name}: {per_step[name]:.2f} s/step (median of {_ROUNDS.value} rounds x {_STEPS.value} steps), "
            f"{tokens_per_step / per_step[name]:.0f} tokens/s")
    print(f"speedup: {statistics.median(ratios):.2f}x (rounds: {min(ratios):.2f}x - {max(ratios):.2f}x); "
          f"the cache build cost {build_s / per_step['today']:.1f} of today's steps")


if __name__ == "__main__":
  cli.run(main)
