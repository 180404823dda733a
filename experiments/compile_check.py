"""Lower and compile a config's train and eval steps ahead of time, without data or training; print memory, FLOPs
and compile time.

  python -m experiments.compile_check --config experiments/configs/qwen25_1p5b_aot.py [--fake_devices=8]
  python -m experiments.compile_check --config experiments/configs/qwen25_1p5b_v5e.py --topology=v5e:2x4 [--json=-]

Uses the trainer's own state initialisation shapes, shardings and step functions, so what compiles here is what
`experiments.train` runs. Default: N fake CPU devices (--fake_devices, default 8; 0 = the real devices). With
--topology (needs libtpu, requirements-tpu.txt) it compiles with the real TPU compiler for that slice from any host
(lenvm_jax/train/aot.py) and checks each step against the device's HBM: exit status 3 when one does not fit.

Printed per device: memory (arguments, outputs, temporaries, generated code, their total against HBM), the
compiler's FLOPs (train/step.py train_step_flops: every scan multiplied out, divided by the devices) next to the
model's (6N + attention, lenvm_jax/model/flops.py), and the compile time. --json writes the same as one object.
"""

import os
import sys

DOES_NOT_FIT_EXIT = 3


def _flag_value(argv, name: str, default: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _set_devices(argv):
  """Before JAX starts: fake CPU devices, or (--topology) CPU as the backend with libtpu only compiling."""
  if "jax" in sys.modules:
    return
  count = int(_flag_value(argv, "fake_devices", "8"))
  if _flag_value(argv, "topology", ""):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  elif count > 0:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


_set_devices(sys.argv)

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from lenvm_jax import sharding  # noqa: E402
from lenvm_jax.data import rows  # noqa: E402
from lenvm_jax.value.objective import Objective  # noqa: E402
from lenvm_jax import config as config_lib  # noqa: E402
from lenvm_jax.config import RunConfig  # noqa: E402
from lenvm_jax.model import attention, flops as flops_lib  # noqa: E402
from lenvm_jax.train import aot, program as program_lib, step as step_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("fake_devices", 8, "Fake CPU devices to compile for (0 = the real devices); not with --topology.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU slice to compile for with libtpu, from any host: v5e:2x4, "
                                "v5p:2x2x4, v4:2x2x2, v6e:2x4, ... (empty: fake CPU devices).")
_STEPS = flags.DEFINE_enum("steps", "both", ["both", "train", "eval", "decode", "all"],
                           "Which steps to compile: both = train and eval; decode = guided generation (a generator "
                           "and a LenVM of the config's shape, --decode_*); all = the three.")
_SLOTS = flags.DEFINE_integer("decode_slots", 64, "--steps=decode: rows generated at once.")
_DECODE_LEN = flags.DEFINE_integer("decode_len", 4096, "--steps=decode: KV-cache slots per row (prompt + answer).")
_DECODE_PROMPT = flags.DEFINE_integer("decode_prompt_len", 512, "--steps=decode: prompt tokens per row.")
_CANDIDATES = flags.DEFINE_integer("decode_candidates", 5, "--steps=decode: candidates the LenVM scores per step.")
_DECODE_MODELS = flags.DEFINE_enum("decode_models", "pair", ["pair", "shared"],
                                   "--steps=decode: a generator and a separate LenVM (pair), or one shared trunk.")
_JSON = flags.DEFINE_string("json", "", "Write the report as JSON to this path ('-': stdout, instead of the text).")
flags.mark_flags_as_required(["config"])


def batch_structs(run: RunConfig, mesh, rows_count: int, leading_dims: tuple[int, ...], leading: int):
  """ShapeDtypeStructs of a batch in the row format (lenvm_jax/data/rows.py), with batch shardings."""
  del rows_count
  dtypes = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "value_mask": bool,
            "remaining": np.int32, "completion_index": np.int32, "completion_length": np.int32,
            "lm_targets": np.int32, "lm_mask": bool}
  assert set(dtypes) == set(rows.PACKED_FIELDS) | {"positions", "segment_ids"}
  shape = leading_dims + (run.data.max_len,)
  example = {k: np.zeros((1,) * len(shape), d) for k, d in dtypes.items()}
  shardings = sharding.batch_shardings(mesh, example, leading)
  return {k: jax.ShapeDtypeStruct(shape, d, sharding=shardings[k]) for k, d in dtypes.items()}, shardings


def gib(n) -> str:
  return f"{n / 2**30:.2f} GiB"


def _compile(jitted, args, capacity, lowered: bool = False):
  """(report dict, compiled or None): compile time and memory, or libtpu's out-of-memory refusal. lowered: jitted
  is already lowered (args unused)."""
  start = time.perf_counter()
  try:
    compiled = (jitted if lowered else jitted.lower(*args)).compile()
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises XlaRuntimeError; others are re-raised)
    refusal = aot.out_of_memory(e)
    if refusal is None:
      raise
    return {"compile_seconds": time.perf_counter() - start, "fits": False, "error": refusal}, None
  memory = aot.MemoryReport.of(compiled, capacity)
  # XLA's count of the compiled program per device, each loop body once: what MaxText's train_compile prints
  # (experiments/bench_compile.py sets the two side by side); the multiplied-out count is added by compile_report.
  loop_bodies_once = float((compiled.cost_analysis() or {}).get("flops", 0.0))
  return {"compile_seconds": time.perf_counter() - start, "fits": memory.fits, "memory": memory.as_dict(),
          "compiled_flops_per_device": loop_bodies_once}, compiled


def _compile_decode(run: RunConfig, mesh, graphdef, params_shape, capacity) -> dict:
  """Compiles the decode engine's step program (lenvm_jax/decoding/engine.py) with guidance on: top-k candidates
  scored by the LenVM over its KV cache, the chosen one committed, the generator's next step, for
  --decode_slots rows of --decode_len cache slots, with the params in their stored dtype, as policies load them."""
  from lenvm_jax.decoding import generation, guided_models, sampler  # pylint: disable=g-import-not-at-top
  if not 0 < _DECODE_PROMPT.value < _DECODE_LEN.value:
    raise app.UsageError(f"--decode_prompt_len must lie in (0, --decode_len={_DECODE_LEN.value}), "
                         f"got {_DECODE_PROMPT.value}")
  kind = Objective.from_config(run.loss).kind
  vocab = run.model.vocab_size
  if _DECODE_MODELS.value == "pair":
    models = guided_models.Pair(guided_models.TransformerGenerator(graphdef, vocab),
                                guided_models.TransformerScorer(graphdef, kind))
    params = (params_shape, params_shape)
  else:
    models, params = guided_models.SharedTrunk(graphdef, kind, vocab), params_shape
  # The EOS id is a value inside the program, not a shape: any id compiles the same program.
  settings = sampler.SamplingConfig(max_new_tokens=_DECODE_LEN.value - _DECODE_PROMPT.value, eos_ids=(0,), top_k=15)
  with cli.user_errors(ValueError):  # Slots the mesh does not divide, candidates beyond the vocabulary.
    guided = generation.GuidedSampler(models, params, settings, mesh, num_candidates=_CANDIDATES.value,
                                      batch_size=_SLOTS.value)
  report, _ = _compile(guided.lower(_DECODE_PROMPT.value), (), capacity, lowered=True)
  report.update(slots=_SLOTS.value, cache_len=_DECODE_LEN.value, prompt_len=_DECODE_PROMPT.value,
                candidates=_CANDIDATES.value, models=_DECODE_MODELS.value)
  return report


def compile_report(run: RunConfig, devices=None, steps: str = "both") -> dict:
  """Compiles the run's steps on its mesh over `devices` (None: JAX's devices) and reports each."""
  model_config = run.model
  with cli.user_errors(ValueError):  # A mesh that the devices cannot hold.
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=devices)
  config_lib.check_batch_fits_mesh(run, mesh, 1 if devices is not None else jax.process_count())
  accum, t = run.train.accum_steps, run.data.max_len
  device = mesh.devices.flat[0]
  capacity = aot.available_hbm_bytes(device) if devices is not None else None
  with jax.set_mesh(mesh):
    program, state_shape = program_lib.build(run, mesh, initialize=False)  # The EMA's memory too.
    train_batch, train_sh = batch_structs(run, mesh, run.train.batch_size,
                                          (accum, run.train.batch_size // accum), leading=1)
    eval_batch, eval_sh = batch_structs(run, mesh, run.train.eval_batch_size,
                                        (run.train.eval_batch_size,), leading=0)
    train, evaluate = program.jit_steps(state_shape, train_sh, eval_sh)
    kernel = attention.implementation(model_config, t)  # Under the mesh: the platform compiled for.
    reports = {}
    if steps in ("both", "train", "all"):
      reports["train"], _ = _compile(train, (state_shape, train_batch), capacity)
    if steps in ("both", "eval", "all"):
      reports["eval"], _ = _compile(evaluate, (state_shape.params, eval_batch), capacity)
    if steps in ("decode", "all"):
      reports["decode"] = _compile_decode(run, mesh, program.graphdef, state_shape.params, capacity)
  lm_share = 1.0 / run.loss.lm_stride if run.loss.lm_weight > 0 else 0.0
  per_token = flops_lib.train_flops_per_token(model_config, t, lm_share)
  if "train" in reports:
    reports["train"]["compiler_flops_per_device"] = program.train_step_flops(state_shape, train_batch) / mesh.size
    reports["train"]["model_flops_per_device"] = per_token * run.train.batch_size * t / mesh.size
  if "eval" in reports:
    reports["eval"]["compiler_flops_per_device"] = step_lib.eval_step_flops(
        model_config, program.objective, state_shape.params, eval_batch) / mesh.size
    reports["eval"]["model_flops_per_device"] = per_token / 3 * run.train.eval_batch_size * t / mesh.size
  return {
      "topology": _TOPOLOGY.value or None, "platform": device.platform,
      "device_kind": getattr(device, "device_kind", ""), "devices": mesh.size, "mesh": dict(mesh.shape),
      "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape.params)),
      "hbm_per_device": capacity, "max_len": t, "batch_size": run.train.batch_size, "accum_steps": accum,
      "remat": model_config.remat, "dtype": model_config.dtype, "steps": reports,
      "attention": kernel, "lm_weight": run.loss.lm_weight,
      "lm_chunk": run.loss.lm_chunk,
      "fits": all(r["fits"] for r in reports.values()),
  }


def format_report(report: dict) -> str:
  where = f"{report['devices']} {report['platform']} devices"
  if report["topology"]:
    hbm = report["hbm_per_device"]
    where += (f" ({report['device_kind']}, topology {report['topology']}, "
              f"{gib(hbm) if hbm else 'unknown'} HBM each)")
  lines = [f"model: {report['parameters'] / 1e9:.3f}B parameters, mesh {report['mesh']} on {where}; "
           f"T {report['max_len']} x B {report['batch_size']} (accum {report['accum_steps']}), remat "
           f"{report['remat']}, dtype {report['dtype']}, attention {report['attention']}"
           + (f", LM term on (chunk {report['lm_chunk'] or 'whole rows'})" if report["lm_weight"] else "")]
  for name, r in report["steps"].items():
    if name == "decode":
      name = (f"decode ({r['models']}, {r['slots']} slots x {r['cache_len']} tokens, prompts {r['prompt_len']}, "
              f"{r['candidates']} candidates)")
      flops = "FLOPs not counted (a while loop of data-dependent length)"
    else:
      flops = (f"{r['compiler_flops_per_device'] / 1e12:.2f} TFLOP per device by the compiler (scans multiplied "
               f"out), {r['model_flops_per_device'] / 1e12:.2f} by the model (6N + attention"
               f"{' + LM head' if report['lm_weight'] else ''})")
    if "memory" not in r:
      lines.append(f"{name} step: DOES NOT FIT: {r['error']}; compiled for {r['compile_seconds']:.0f} s; {flops}")
      continue
    m = r["memory"]
    capacity = f" of {gib(m['capacity'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}" if m["capacity"] else ""
    host = f", host (offloaded) {gib(m['host_temporaries'])}" if m["host_temporaries"] else ""
    lines.append(f"{name} step: per device: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])} "
                 f"(aliased {gib(m['aliased'])}), temporaries {gib(m['temporaries'])}, generated code "
                 f"{gib(m['generated_code'])}{host}, total {gib(m['total'])}{capacity}; compiled in "
                 f"{r['compile_seconds']:.0f} s; {flops}")
  return "\n".join(lines)


def main(argv):
  del argv
  run = RunConfig.from_dict(_CONFIG.value)
  devices = aot.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value else None
  report = compile_report(run, devices, _STEPS.value)
  if _JSON.value == "-":
    print(json.dumps(report, indent=2, sort_keys=True))
  else:
    print(format_report(report), flush=True)
    if _JSON.value:
      with open(_JSON.value, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
  if not report["fits"]:
    sys.exit(DOES_NOT_FIT_EXIT)


if __name__ == "__main__":
  cli.run(main)
