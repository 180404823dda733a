import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_real_shape_config_compiles_ahead_of_time_on_eight_fake_devices():
  """The Qwen2.5-1.5B-width config (2 of its 28 layers, to keep CI short) lowers and compiles on a 2x2x2 mesh."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.compile_check", "--config", "experiments/configs/qwen25_1p5b_aot.py",
       "--config.model.num_layers=2"], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu devices" in out
  # 2 layers of Qwen2.5-1.5B + embeddings + value head.
  assert re.search(r"model: 0\.3[0-9]{2}B parameters", out), out
  train = re.search(r"train step: per device: arguments ([0-9.]+) GiB.*temporaries ([0-9.]+) GiB", out)
  assert train and float(train.group(1)) > 0.1, out


# TPU compiles from this (CPU-only) host: libtpu's compiler behind --topology, in the python that conftest.tpu_python
# gives (CI builds .venv-tpu for it), so a broken TPU path fails CI: the splash kernel's AOT compile broke once
# (55f2cc5) while these tests were skipped.


def _compile_check(python, tmp_path, *flags, config="experiments/configs/tiny.py"):
  out = tmp_path / "report.json"
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # A libtpu process of another test run may be alive.
  result = subprocess.run([python, "-m", "experiments.compile_check", "--config", config, "--topology=v5e:2x4",
                           f"--json={out}", *flags], cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
  return result, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
def test_tpu_topology_compile_reports_memory_flops_and_time(tpu_python, tmp_path):
  """The tiny model on v5e:2x4 with rows the splash kernel takes (256 tokens) and the chunked LM term on."""
  result, report = _compile_check(tpu_python, tmp_path, "--config.data.max_len=256", "--config.loss.lm_weight=0.5",
                                  "--config.loss.lm_chunk=64", "--config.model.remat=full")
  assert result.returncode == 0, result.stderr[-3000:]
  assert report["platform"] == "tpu" and report["device_kind"] == "TPU v5 lite" and report["devices"] == 8
  assert report["attention"] == "splash", report
  assert report["hbm_per_device"] == int(15.75 * 2**30) and report["fits"]
  for name in ("train", "eval"):
    step = report["steps"][name]
    assert step["fits"] and step["compile_seconds"] > 0
    assert 0 < step["memory"]["total"] <= step["memory"]["capacity"]
    # Layers and micro-batches multiplied out: the compiler's count is the model's plus remat and small ops.
    assert step["model_flops_per_device"] > 0
    assert 0.8 < step["compiler_flops_per_device"] / step["model_flops_per_device"] < 2.0, step
  assert "of 15.75 GiB: fits" in result.stdout and "attention splash" in result.stdout


@pytest.mark.slow
def test_tpu_compile_of_a_qwen25_layer_with_the_chunked_lm_term_fits(tpu_python, tmp_path):
  """Qwen2.5-1.5B's shapes (1 of its 28 layers, 2k-token rows), FSDP over v5e:2x4, LM term on: its 151,936-row
  vocabulary goes through the chunked cross-entropy and the rows through splash, as on a real slice (one compile,
  ~100 s; what the chunks save is measured on the tiny model below, whose compiles are a fraction of that)."""
  result, report = _compile_check(
      tpu_python, tmp_path, "--steps=train", "--config.model.num_layers=1", "--config.data.max_len=2048",
      "--config.loss.lm_weight=1", "--config.loss.lm_chunk=256",
      config="experiments/configs/paper_shapes.py:qwen2.5-1.5b")
  assert result.returncode == 0, result.stderr[-3000:]
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and report["attention"] == "splash"
  assert report["fits"] and report["steps"]["train"]["fits"] and report["lm_chunk"] == 256


@pytest.mark.slow
def test_tpu_compile_of_the_chunked_lm_term_keeps_the_logits_out_of_the_temporaries(tpu_python, tmp_path):
  """Qwen's 151,936-word vocabulary on the tiny model, 2k-token rows: the chunks keep the [tokens, vocab] float32
  array out of the train step's temporaries, which stay under half of it (measured: 0.23 GiB chunked against
  1.76 GiB with whole rows, lm_chunk=0, where that array is 1.16 GiB: whole rows fail this; for Qwen2.5-1.5B's layer
  2.10 against 3.05 GiB; at T 8192 the saving is 5.7 GiB, docs/scaling.md). One compile: the whole-row compile
  that once stood beside it as a control costs as much and the bound alone fails on it."""
  result, chunked = _compile_check(
      tpu_python, tmp_path, "--steps=train", "--config.model.vocab_size=151936", "--config.data.max_len=2048",
      "--config.loss.lm_weight=1", "--config.loss.lm_chunk=256")
  assert result.returncode == 0, result.stderr[-3000:]
  assert chunked["attention"] == "splash" and chunked["lm_chunk"] == 256
  tokens_per_chip = chunked["max_len"] * chunked["batch_size"] // chunked["devices"]
  logits_bytes = tokens_per_chip * 151936 * 4
  temporaries = chunked["steps"]["train"]["memory"]["temporaries"]
  assert temporaries < logits_bytes / 2, (temporaries, logits_bytes)


@pytest.mark.slow
def test_tpu_compile_of_guided_decoding_with_a_generator_and_a_lenvm(tpu_python, tmp_path):
  """The decode program (prefill, then the loop that scores k candidates with the LenVM and commits one) for a
  data x tensor mesh: both models' parameters and KV caches are in its arguments and temporaries."""
  result, report = _compile_check(tpu_python, tmp_path, "--steps=decode", "--decode_slots=16", "--decode_len=256",
                                  "--decode_prompt_len=32", "--decode_candidates=5", "--config.mesh.data=4",
                                  "--config.mesh.tensor=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2} and set(report["steps"]) == {"decode"}
  decode = report["steps"]["decode"]
  assert decode["fits"] and (decode["slots"], decode["cache_len"], decode["candidates"]) == (16, 256, 5)
  # Two models' float32 parameters (4 bytes each), sharded at most 2-way (tensor): >= 2 x 4 P / 2 bytes per device.
  assert decode["memory"]["arguments"] >= 4 * report["parameters"], decode
  assert "decode (pair, 16 slots x 256 tokens, prompts 32, 5 candidates) step: per device" in result.stdout


@pytest.mark.slow
def test_tpu_topology_compile_exits_3_when_a_step_does_not_fit(tpu_python, tmp_path):
  # A 4M x 1024 embedding, replicated on a data-parallel mesh: 16 GiB of weights and twice that of Adam moments.
  result, report = _compile_check(tpu_python, tmp_path, "--steps=train", "--config.model.vocab_size=4194304",
                                  "--config.model.hidden_size=1024")
  assert result.returncode == 3, result.stderr[-3000:]
  assert not report["fits"] and not report["steps"]["train"]["fits"]
  assert "DOES NOT FIT" in result.stdout


def test_topology_without_libtpu_is_one_error_line(tmp_path):
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed here")
  result, _ = _compile_check(sys.executable, tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --topology=v5e:2x4 needs libtpu")


def test_paper_shapes_build_and_fill_the_slices_they_are_sized_for():
  import math
  from experiments.configs import paper_shapes
  from lenvm_jax.config import RunConfig
  for name, (preset, mesh, max_len, batch, accum, topology) in paper_shapes.SHAPES.items():
    run = RunConfig.from_dict(paper_shapes.get_config(name))
    chips = math.prod(int(d) for d in topology.split(":")[1].split("x"))
    assert (run.mesh.data, run.mesh.fsdp, run.mesh.tensor) == mesh and math.prod(mesh) == chips, name
    assert (batch // accum) % (mesh[0] * mesh[1]) == 0 and run.data.max_len == max_len, name
    assert run.model.vocab_size > 150_000 and run.model.dtype == "bfloat16" and run.model.remat == "full", name
    assert run.model.num_layers == {"qwen2.5-1.5b": 28, "qwen2.5-7b": 28, "qwen3-8b": 36, "qwen3-32b": 64}[preset]


def test_bench_compile_reads_maxtexts_memory_and_flops_as_train_compile_prints_them():
  """Lines as MaxText 0.2.5's train_compile printed them for Qwen2.5-1.5B on v5e-8 (docs/benchmarks.md)."""
  from lenvm_jax.train import aot
  printed = (
      "I1207 11:02:33.118240 140025665620864 maxtext_utils.py:2098] Num_devices: 8, shape (1, 1, 1, 8, 1, 1)\n"
      "Finished train_compile.py successfully!\n"
      "Cost analysis: {'utilization0{}': 2362.89, 'flops': 11553046790144.0, 'bytes accessedout{0}': 568434688.0}\n"
      "Memory analysis: CompiledMemoryStats(generated_code_size_in_bytes=42561024, argument_size_in_bytes=2317529088, "
      "output_size_in_bytes=2317338624, alias_size_in_bytes=2317332480, temp_size_in_bytes=7211483136, "
      "host_generated_code_size_in_bytes=0, host_argument_size_in_bytes=0, host_output_size_in_bytes=0, "
      "host_alias_size_in_bytes=0, host_temp_size_in_bytes=0)\n")
  assert aot.parse_maxtext_report(printed) == {
      "devices": 8, "temporaries": 7211483136, "arguments": 2317529088, "compiled_flops_per_device": 11553046790144.0,
      "total": 2317529088 + 2317338624 - 2317332480 + 7211483136 + 42561024}
  assert aot.parse_maxtext_report(printed.replace("Memory analysis", "Memory")) is None


def test_bench_compile_without_maxtext_is_one_error_line():
  result = subprocess.run([sys.executable, "-m", "experiments.bench_compile", f"--maxtext_python={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and sys.executable in last, last


def test_model_flops_count_the_lm_head_on_the_lm_positions_only():
  from lenvm_jax import model_config
  from lenvm_jax.model import flops
  c = model_config.ModelConfig(**model_config.preset_fields("qwen2.5-1.5b"))
  value_only = flops.train_flops_per_token(c, 8192)
  assert flops.train_flops_per_token(c, 8192, 1.0) - value_only == 6 * c.hidden_size * c.vocab_size
  assert flops.train_flops_per_token(c, 8192, 0.25) - value_only == 6 * c.hidden_size * c.vocab_size / 4
