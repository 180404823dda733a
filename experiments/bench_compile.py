"""Ahead-of-time TPU compiles side by side: MaxText's train_compile and our compile_check, same model, slice, shapes.

  .venv-tpu/bin/python -m experiments.bench_compile --maxtext_python=/path/to/maxtext-venv/bin/python
      [--model=qwen2.5-1.5b --topology=v5e:2x4 --maxtext_topology=v5e-8 --max_len=8192 --batch=8 --json=PATH]

MaxText (pip `maxtext[tpu]==0.2.5`, Python >= 3.12, in its own venv: it brings its own jax and libtpu) is the tool a
user would otherwise pick to train a Qwen2.5 decoder on TPUs; both sides here compile one training step for the same
TPU slice from this (CPU-only) host with libtpu, nothing runs. Both sides: the model's real shapes (MaxText's
model_name and our paper_shapes preset of the same name), FSDP over every chip, T x B tokens (per-device batch
B / chips), remat of each whole layer, bfloat16 compute, float32 weights and AdamW moments, scanned layers, the TPU
attention kernel. MaxText trains the LM loss; ours is run twice: the shared trunk's joint LM + value objective
(loss.lm_weight=1, the counterpart) and value-only training (loss.lm_weight=0, what a LenVM fine-tune runs).

Printed per side: memory per chip from the compiled step's memory analysis (temporaries; arguments; the total
arguments + outputs - aliased + temporaries + code); FLOPs per chip three ways: each tool's analytic count (MaxText's
calculate_tflops_training_per_device: 6 N + causal attention, half the square; ours: 6 N + the LM head's 6 N V + the
whole square), XLA's count with every loop multiplied out (ours only: train/step.py train_step_flops) and XLA's count
of the compiled program (each loop body once, as train_compile prints it: not comparable across the two, MaxText's LM
head is outside any loop and ours inside its chunk loop); the process's wall and CPU seconds (import, trace and
compile: this host is shared, so CPU seconds are the steadier figure); each side's jax and libtpu versions. Then
ours / MaxText for each.
"""

import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import cli
from lenvm_jax import errors
from lenvm_jax.train import aot

_MAXTEXT_PYTHON = flags.DEFINE_string("maxtext_python", None, "python of a venv with maxtext[tpu]==0.2.5.")
_MODEL = flags.DEFINE_string("model", "qwen2.5-1.5b", "MaxText model_name = our experiments/configs/paper_shapes.py "
                             "preset.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x4", "Our --topology (libtpu's name).")
_MAXTEXT_TOPOLOGY = flags.DEFINE_string("maxtext_topology", "v5e-8", "MaxText's compile_topology for the same slice.")
_MAX_LEN = flags.DEFINE_integer("max_len", 8192, "Tokens per row on both sides.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per step on both sides (a multiple of the chips).")
_JSON = flags.DEFINE_string("json", "", "Also write every figure as JSON to this path.")
flags.mark_flags_as_required(["maxtext_python"])


def _run(command, env=None) -> tuple[subprocess.CompletedProcess, float, float]:
  """The finished process, its wall seconds and its CPU seconds (user + system, children included)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return result, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _versions(python: str) -> str:
  code = ("import importlib.metadata as m; print(f\"jax {m.version('jax')}, jaxlib {m.version('jaxlib')}, "
          "libtpu {m.version('libtpu')}\")")
  result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
  if result.returncode:
    raise errors.UserError(f"{python} cannot report its jax / libtpu versions (is libtpu installed there?): "
                               f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
  return result.stdout.strip()


def _maxtext_base_config(python: str) -> str:
  """MaxText's base.yml in the venv of `python`; a clear error when maxtext is not installed there."""
  site = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                        capture_output=True, text=True, timeout=300)
  if site.returncode:
    raise errors.UserError(f"--maxtext_python={python} cannot import maxtext: pip install 'maxtext[tpu]==0.2.5' "
                           "into a Python 3.12 venv (docs/benchmarks.md)")
  return os.path.join(site.stdout.strip(), "configs", "base.yml")


# MaxText's own analytic count (the TFLOPs its trainer logs), from its config: weights 6 N per token + causal
# attention (half the square).
_MAXTEXT_MODEL_FLOPS = """
import sys
from maxtext.configs import pyconfig
from maxtext.utils import maxtext_utils
print("TFLOPS", maxtext_utils.calculate_tflops_training_per_device(pyconfig.initialize(sys.argv), log=False)[0])
"""


def _maxtext(python: str, chips: int, workdir: str) -> dict:
  config = [_maxtext_base_config(python), f"model_name={_MODEL.value}",
            f"compile_topology={_MAXTEXT_TOPOLOGY.value}", "compile_topology_num_slices=1",
            f"per_device_batch_size={_BATCH.value // chips}", f"max_target_length={_MAX_LEN.value}",
            f"ici_fsdp_parallelism={chips}", "remat_policy=full", "dataset_type=synthetic",
            f"base_output_directory={workdir}", "run_name=bench_compile"]
  command = [python, "-m", "maxtext.trainers.pre_train.train_compile", *config]
  result, wall, cpu = _run(command)
  parsed = aot.parse_maxtext_report(result.stdout + result.stderr)
  if result.returncode or parsed is None:
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"MaxText's train_compile failed (exit {result.returncode}): {' | '.join(tail)}")
  counted = subprocess.run([python, "-c", _MAXTEXT_MODEL_FLOPS, *config], capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  model_tflops = re.search(r"^TFLOPS ([0-9.e+]+)$", counted.stdout, re.M)
  return {"command": " ".join(command[1:]), **parsed, "flops_multiplied_out": None,
          "model_flops_per_device": float(model_tflops.group(1)) * 1e12 if model_tflops else None,
          "wall_seconds": wall, "cpu_seconds": cpu}


def _ours(lm_weight: float, workdir: str) -> dict:
  report_path = os.path.join(workdir, f"ours_lm{lm_weight:g}.json")
  command = [sys.executable, "-m", "experiments.compile_check", "--config",
             f"experiments/configs/paper_shapes.py:{_MODEL.value}", f"--topology={_TOPOLOGY.value}", "--steps=train",
             f"--config.data.max_len={_MAX_LEN.value}", f"--config.train.batch_size={_BATCH.value}",
             "--config.train.accum_steps=1", f"--config.loss.lm_weight={lm_weight:g}", f"--json={report_path}"]
  result, wall, cpu = _run(command, env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1])))
  if result.returncode or not os.path.exists(report_path):
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"our compile_check failed (exit {result.returncode}): {' | '.join(tail)}")
  with open(report_path, encoding="utf-8") as f:
    report = json.load(f)
  train = report["steps"]["train"]
  if "memory" not in train:
    raise RuntimeError(f"our step does not fit: {train.get('error')}")
  return {"command": " ".join(["python"] + command[1:-1]), "devices": report["devices"],
          "temporaries": train["memory"]["temporaries"], "arguments": train["memory"]["arguments"],
          "total": train["memory"]["total"], "compiled_flops_per_device": train["compiled_flops_per_device"],
          "flops_multiplied_out": train["compiler_flops_per_device"],
          "model_flops_per_device": train["model_flops_per_device"], "wall_seconds": wall, "cpu_seconds": cpu,
          "attention": report["attention"]}


def _table(sides: dict) -> str:
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  tflop = lambda n: "" if n is None else f"{n / 1e12:.2f} TFLOP"
  rows = [("temporaries per chip", "temporaries", gib), ("arguments per chip", "arguments", gib),
          ("total per chip", "total", gib),
          ("FLOPs per chip by the model (analytic)", "model_flops_per_device", tflop),
          ("FLOPs per chip by XLA, every loop multiplied out", "flops_multiplied_out", tflop),
          ("FLOPs per chip by XLA, each loop body once", "compiled_flops_per_device", tflop),
          ("process wall seconds", "wall_seconds", lambda s: f"{s:.0f} s"),
          ("process CPU seconds", "cpu_seconds", lambda s: f"{s:.0f} s")]
  names = list(sides)
  lines = [f"{'':50}" + "".join(f"{n:>26}" for n in names) + "".join(f"{'ratio ' + n:>26}" for n in names[1:])]
  for label, key, fmt in rows:
    values = [sides[n][key] for n in names]
    ratios = [("" if values[0] in (None, 0) or v is None else f"{v / values[0]:.2f}x") for v in values[1:]]
    lines.append(f"{label:50}" + "".join(f"{fmt(v) if v is not None else '':>26}" for v in values) +
                 "".join(f"{r:>26}" for r in ratios))
  return "\n".join(lines)


def main(argv):
  del argv
  _maxtext_base_config(_MAXTEXT_PYTHON.value)  # Before any compile: a missing MaxText fails at once.
  versions = {"maxtext": _versions(_MAXTEXT_PYTHON.value), "ours": _versions(sys.executable)}
  with tempfile.TemporaryDirectory() as workdir:
    lm = _ours(1.0, workdir)
    chips = lm["devices"]
    if _BATCH.value % chips:
      raise errors.UserError(f"--batch={_BATCH.value} must be a multiple of the slice's {chips} chips")
    value_only = _ours(0.0, workdir)
    maxtext = _maxtext(_MAXTEXT_PYTHON.value, chips, workdir)
  if maxtext["devices"] not in (None, chips):
    raise errors.UserError(f"--maxtext_topology={_MAXTEXT_TOPOLOGY.value} has {maxtext['devices']} chips, "
                               f"--topology={_TOPOLOGY.value} {chips}: name the same slice")
  sides = {"MaxText (LM)": maxtext, "ours (LM + value)": lm, "ours (value only)": value_only}
  print(f"bench_compile: {_MODEL.value}, {chips} chips ({_TOPOLOGY.value} / {_MAXTEXT_TOPOLOGY.value}), FSDP "
        f"{chips}, T {_MAX_LEN.value} x B {_BATCH.value}, remat full, bf16 compute, f32 weights + AdamW; our "
        f"attention: {lm['attention']}")
  for name, side in sides.items():
    print(f"  {name}: {versions['maxtext' if name.startswith('MaxText') else 'ours']}; {side['command']}")
  print(_table(sides))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"versions": versions, "sides": sides}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  cli.run(main)
