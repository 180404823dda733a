"""Lower and compile a config's train and eval steps ahead of time, without data or training; print memory.

  python -m experiments.compile_check --config experiments/configs/qwen25_1p5b_aot.py [--fake_devices=8]

Uses the trainer's own state initialisation shapes, shardings and step functions, so what compiles here is what
`experiments.train` runs. With --fake_devices N (default 8) it runs on N fake CPU devices.
"""

import os
import sys


def _set_fake_devices(argv):
  count = 8
  for arg in argv:
    if arg.startswith("--fake_devices="):
      count = int(arg.split("=", 1)[1])
  if count > 0 and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


_set_fake_devices(sys.argv)

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from lenvm_jax import sharding  # noqa: E402
from lenvm_jax.data import rows  # noqa: E402
from lenvm_jax.value.objective import Objective  # noqa: E402
from lenvm_jax import config as config_lib  # noqa: E402
from lenvm_jax.config import RunConfig  # noqa: E402
from lenvm_jax.model import transformer  # noqa: E402
from lenvm_jax.train import optimizer, state as state_lib, step as step_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("fake_devices", 8, "Fake CPU devices to compile for (0 = the real devices).")
flags.mark_flags_as_required(["config"])


def batch_structs(run: RunConfig, mesh, rows_count: int, leading_dims: tuple[int, ...], leading: int):
  """ShapeDtypeStructs of a batch in the row format (lenvm_jax/data/rows.py), with batch shardings."""
  dtypes = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "value_mask": bool,
            "remaining": np.int32, "completion_index": np.int32, "completion_length": np.int32,
            "lm_targets": np.int32, "lm_mask": bool}
  assert set(dtypes) == set(rows.PACKED_FIELDS) | {"positions", "segment_ids"}
  shape = leading_dims + (run.data.max_len,)
  example = {k: np.zeros((1,) * len(shape), d) for k, d in dtypes.items()}
  shardings = sharding.batch_shardings(mesh, example, leading)
  return {k: jax.ShapeDtypeStruct(shape, d, sharding=shardings[k]) for k, d in dtypes.items()}, shardings


def gib(n):
  return f"{n / 2**30:.2f} GiB"


def main(argv):
  del argv
  run = RunConfig.from_dict(_CONFIG.value)
  model_config = run.model
  with cli.user_errors(ValueError):  # A mesh that the (fake) devices cannot hold.
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
  config_lib.check_batch_fits_mesh(run, mesh, jax.process_count())
  accum = run.train.accum_steps
  with jax.set_mesh(mesh):
    graphdef, abstract = transformer.abstract_model(model_config)
    tx = optimizer.make_optimizer(run, abstract.to_pure_dict())
    state_shape, state_sh = state_lib.create_train_state(model_config, tx, mesh, run.seed, initialize=False,
                                                         ema=run.train.keeps_ema)  # The EMA's memory too.
    train_batch, train_sh = batch_structs(run, mesh, run.train.batch_size,
                                          (accum, run.train.batch_size // accum), leading=1)
    eval_batch, eval_sh = batch_structs(run, mesh, run.train.eval_batch_size,
                                        (run.train.eval_batch_size,), leading=0)
    start = time.perf_counter()
    train, evaluate = step_lib.compile_steps(graphdef, Objective.from_config(run.loss), tx, run.train, state_sh,
                                             train_sh, eval_sh, state_shape, train_batch, eval_batch)
    seconds = time.perf_counter() - start
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape.params))
  print(f"model: {params / 1e9:.3f}B parameters, mesh {dict(mesh.shape)} on {mesh.size} {jax.default_backend()} "
        f"devices; compiled train + eval steps in {seconds:.0f} s")
  for name, compiled in (("train step", train), ("eval step", evaluate)):
    memory = compiled.memory_analysis()
    flops = compiled.cost_analysis().get("flops", 0.0)
    print(f"{name}: per device: arguments {gib(memory.argument_size_in_bytes)}, outputs "
          f"{gib(memory.output_size_in_bytes)}, temporaries {gib(memory.temp_size_in_bytes)}, "
          f"generated code {gib(memory.generated_code_size_in_bytes)}; {flops / 1e12:.2f} TFLOP per device")


if __name__ == "__main__":
  cli.run(main)
