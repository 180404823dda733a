"""Hugging Face interop: forward parity with `transformers`, sharded loading, export round trip, model.init_from."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from lenvm_jax import sharding
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.model import hf_config, hf_export, hf_import, hf_layout
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import LengthValueModel
from lenvm_jax import config as config_lib
from lenvm_jax.train import trainer
from tests import hf_models
from tests.helpers import REPO, run_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# float32 on both sides; what remains is summation order (einsum vs. torch matmul) and rsqrt vs. 1/sqrt.
# Measured on CPU: at most 3.3e-7 of the tensor's largest entry (hidden states and logits, all three layouts);
# 1e-5 leaves room across BLAS builds while a wrong head layout or missed tensor is off by O(1).
RTOL = 1e-5
# Two sequences of different content, positions 0..T-1, no padding.
TOKENS = np.array([[5, 17, 3, 88, 42, 9, 61, 2, 30, 71, 14, 50],
                   [1, 64, 33, 7, 95, 20, 48, 11, 79, 4, 26, 90]], np.int32)


def _close(ours, reference, rtol=RTOL):
  """|ours - reference| <= rtol * max|reference| elementwise (relative to the tensor's scale, not each entry)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  err = np.max(np.abs(ours - reference)) / np.max(np.abs(reference))
  assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"
  return err


def _forward(model_config, params, tokens=TOKENS):
  """Our final hidden states, LM logits and value logits z on the batch, jitted once."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LengthValueModel(model_config, nnx.Rngs(0))))

  @jax.jit
  def run(params, tokens):
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden = model.hidden_states(tokens, positions, jnp.ones_like(tokens))
    return hidden, model.lm_logits(hidden), model.value_logits(hidden)

  return jax.device_get(run(params, jnp.asarray(tokens)))


def _load(directory, mesh=None, **run_fields):
  model_config = hf_import.load_model_config(str(directory), dtype="float32", **run_fields)
  mesh = mesh or sharding.make_mesh(1, 1, 1)
  return model_config, hf_import.load_params(str(directory), model_config, mesh, seed=0)


def _reference(directory, tokens=TOKENS):
  """transformers' final hidden states (after the final norm) and logits, float32, eager attention."""
  model = hf_models.load_hf_model(directory)
  with torch.no_grad():
    out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy(), model


@pytest.mark.slow
@pytest.mark.parametrize("kind,tied,rope_theta", [("llama", False, 10000.0), ("qwen2", True, 10000.0),
                                                  ("qwen3", False, 1e6)])
def test_hidden_states_and_logits_match_transformers(tmp_path, kind, tied, rope_theta):
  directory = hf_models.save_tiny_hf_model(kind, tmp_path, tie_embeddings=tied, rope_theta=rope_theta)
  model_config, params = _load(directory)
  assert (model_config.tie_embeddings, model_config.qkv_bias, model_config.qk_norm) == (
      tied, kind == "qwen2", kind == "qwen3")
  assert model_config.rope_theta == rope_theta
  hidden, logits, _ = _forward(model_config, params)
  ref_hidden, ref_logits, _ = _reference(directory)
  _close(hidden, ref_hidden)
  _close(logits, ref_logits)


def test_sharded_checkpoint_on_2x2x2_mesh_matches_one_device(tmp_path):
  directory = hf_models.save_tiny_hf_model("qwen3", tmp_path, max_shard_size="20KB")
  assert (directory / hf_import.INDEX_FILE).exists() and not (directory / hf_import.SINGLE_FILE).exists()
  mesh = sharding.make_mesh(2, 2, 2)
  model_config, params = _load(directory, mesh)
  _, single = _load(directory)

  _, abstract = nnx.split(nnx.eval_shape(lambda: LengthValueModel(model_config, nnx.Rngs(0))))
  expected = sharding.param_shardings(abstract, mesh)
  jax.tree.map(lambda leaf, want: np.testing.assert_equal(leaf.sharding.is_equivalent_to(want, leaf.ndim), True),
               params, expected)
  attention = params["layers"]["attention"]
  assert attention["q"].sharding.spec == P(None, "fsdp", "tensor", None)  # [layers, embed, heads, head_dim]
  assert attention["o"].sharding.spec == P(None, "tensor", None, "fsdp")  # [layers, heads, head_dim, embed]
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")  # [vocab, embed]

  with jax.set_mesh(mesh):
    _, sharded_logits, _ = _forward(model_config, params)
  _, single_logits, _ = _forward(model_config, single)
  _close(sharded_logits, single_logits, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(single))


def _random_value_head(model_config, seed=1) -> dict:
  """A value head in the reference file layout, nonzero everywhere (zeros would hide a missed tensor)."""
  rng = np.random.default_rng(seed)
  return {m.hf_name: rng.normal(0, 0.3, m.hf_shape).astype(np.float32)
          for m in hf_layout.value_head_mappings(model_config)}


# llama is exported in shards of at most 32 KiB (model-0000i-of-0000n + index, as save_pretrained splits big models):
# our import and transformers must read them as they read one file.
@pytest.mark.parametrize("kind,tied,max_shard_bytes", [("llama", False, 32 * 1024), ("qwen2", True, 10**9)])
def test_export_import_round_trip_and_pytorch_value_head(tmp_path, kind, tied, max_shard_bytes):
  source = hf_models.save_tiny_hf_model(kind, tmp_path / "source", tie_embeddings=tied)
  model_config = hf_import.load_model_config(str(source), dtype="float32")
  head_tensors = _random_value_head(model_config)
  save_file(head_tensors, str(source / hf_layout.VALUE_HEAD_FILE))
  _, params = _load(source)
  head = jax.device_get(params["value_head"])  # Our [in, out] layout of the PyTorch [out, in] file.
  np.testing.assert_array_equal(head["fc"], head_tensors["v_head.fc.weight"].T)
  np.testing.assert_array_equal(head["summary"], head_tensors["v_head.summary.weight"].T)
  np.testing.assert_array_equal(head["summary_bias"], head_tensors["v_head.summary.bias"])

  out = tmp_path / "exported"
  (out / "model.safetensors").parent.mkdir(parents=True)
  (out / "model.safetensors").write_text("stale")  # An earlier export's weights must not survive a sharded one.
  written = hf_export.export(params, model_config, str(out), tokenizer_dir=str(source), max_shard_bytes=max_shard_bytes)
  assert "generation_config.json" in written  # save_pretrained wrote one; it travels with the tokenizer files.
  shards = sorted(p.name for p in out.glob("model*.safetensors"))
  if max_shard_bytes < 10**9:
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == 4 * sum(
        int(np.prod(m.hf_shape)) for m in hf_layout.trunk_mappings(model_config))
  else:
    assert shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
  assert hf_config.read_hf_config(str(out))["architectures"] == [type(hf_models.load_hf_model(source)).__name__]
  exported_config, again = _load(out)
  assert exported_config == model_config
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))

  with safe_open(str(out / hf_layout.VALUE_HEAD_FILE), framework="numpy") as f:
    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
  h = model_config.hidden_size
  assert shapes == {"v_head.fc.weight": (h, h), "v_head.fc.bias": (h,), "v_head.summary.weight": (1, h),
                    "v_head.summary.bias": (1,)}

  # The reference side: transformers trunk + a PyTorch Linear-SiLU-Linear head read from value_head.safetensors.
  from safetensors.torch import load_file
  head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.SiLU(), torch.nn.Linear(h, 1))
  tensors = load_file(str(out / hf_layout.VALUE_HEAD_FILE))
  head.load_state_dict({"0.weight": tensors["v_head.fc.weight"], "0.bias": tensors["v_head.fc.bias"],
                        "2.weight": tensors["v_head.summary.weight"], "2.bias": tensors["v_head.summary.bias"]})
  ref_hidden, ref_logits, _ = _reference(out)
  with torch.no_grad():
    ref_z = head(torch.from_numpy(ref_hidden))[..., 0].numpy()
  hidden, logits, z = _forward(model_config, again)
  _close(logits, ref_logits)
  _close(z, ref_z)


def test_unsupported_hf_configs_are_named_errors(tmp_path):
  directory = hf_models.save_tiny_hf_model("qwen2", tmp_path)
  base = hf_config.read_hf_config(str(directory))
  cases = {
      "rope_type 'linear'": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
      "sliding-window": {"use_sliding_window": True, "sliding_window": 16},
      "architectures": {"architectures": ["GPT2LMHeadModel"]},
      "hidden_act": {"hidden_act": "gelu"},
  }
  for message, change in cases.items():
    with pytest.raises(ValueError, match=message):
      hf_config.model_config_from_hf({**base, **change}, "x/config.json")
  with pytest.raises(ValueError, match="attention_bias"):
    hf_config.model_config_from_hf({**base, "architectures": ["LlamaForCausalLM"], "attention_bias": True})


def _init_from_config(tiny_config, directory, steps):
  config = tiny_config
  config.model.vocab_size = hf_models.TINY_SHAPE["vocab_size"]
  config.model.dtype = "float32"
  config.model.init_from = str(directory)
  config.train.steps = steps
  config.train.eval_every = 0
  config.optim.warmup_steps = 4  # Linear warmup from 0: the first update has learning rate 0.
  config.checkpoint.every_steps = 1
  config.mesh.data = 1  # One device: compiles faster; the sharded load has its own test.
  return config


@pytest.mark.slow
def test_init_from_starts_training_from_the_hf_weights_and_export_reads_it_back(tmp_path, tiny_config):
  source = hf_models.save_tiny_hf_model("llama", tmp_path / "hf")
  model_config = hf_import.load_model_config(str(source), dtype="float32")
  save_file(_random_value_head(model_config), str(source / hf_layout.VALUE_HEAD_FILE))
  _, hf_params = _load(source)
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(run_config(_init_from_config(tiny_config, source, steps=2)), str(workdir))

  # The CLI exports the latest checkpoint (step 2): training moved every parameter off its HF value.
  out = tmp_path / "exported"
  result = subprocess.run([sys.executable, "-m", "experiments.export_hf", "--workdir", str(workdir),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint step 2" in result.stdout
  assert (out / "generation_config.json").exists()  # Copied from model.init_from.
  _, exported = _load(out)
  trained = Predictor(str(workdir)).params
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported), jax.device_get(trained))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(exported), jax.device_get(hf_params))
  assert all(jax.tree.leaves(moved))

  # Step 1 ran at learning rate 0 (warmup from 0), so its checkpoint holds the starting weights: the HF ones.
  shutil.rmtree(workdir / "checkpoints" / "2")
  start = Predictor(str(workdir))
  assert start.step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(start.params), jax.device_get(hf_params))


def test_init_from_with_a_mismatched_shape_field_names_both_values(tmp_path, tiny_config):
  source = hf_models.save_tiny_hf_model("llama", tmp_path / "hf")
  config = _init_from_config(tiny_config, source, steps=2)
  config.model.num_layers = 3
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.num_layers=3 but .*config\.json gives 2"):
    trainer.train_and_evaluate(run_config(config), str(tmp_path / "run"))


def test_published_qwen25_config_gives_the_preset_shape():
  """The pre-transformers-5 config.json form (top-level rope_theta, no head_dim, sliding window defined but off)."""
  published = {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 1536,
               "intermediate_size": 8960, "max_window_layers": 21, "num_attention_heads": 12,
               "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
               "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
               "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936}
  model_config = hf_config.model_config_from_hf(published)
  preset = ModelConfig(**preset_fields("qwen2.5-1.5b"))
  assert model_config == preset
  assert hf_config.model_config_from_hf(hf_config.hf_config_from_model_config(model_config)) == model_config


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  """Public checkpoints are bf16: read through safetensors.numpy (ml_dtypes) and widened exactly."""
  source = hf_models.save_tiny_hf_model("qwen2", tmp_path / "f32")
  bf16 = tmp_path / "bf16"
  bf16.mkdir()
  shutil.copyfile(source / "config.json", bf16 / "config.json")
  with safe_open(str(source / hf_import.SINGLE_FILE), framework="numpy") as f:
    tensors = {name: f.get_tensor(name).astype(ml_dtypes.bfloat16) for name in f.keys()}
  save_file(tensors, str(bf16 / hf_import.SINGLE_FILE), metadata={"format": "pt"})
  _, wide = _load(source)
  _, narrow = _load(bf16)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                         jax.device_get(wide["layers"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(narrow["layers"]), rounded)
  assert narrow["embedding"].dtype == jnp.float32
