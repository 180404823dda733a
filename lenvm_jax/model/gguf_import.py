"""Load a llama.cpp GGUF file (Llama / Qwen2 / Qwen3 architecture) as LengthValueModel params, and rebuild its
tokenizer, so that a quantized checkpoint can start a run or serve as a policy like a Hugging Face directory.

Every tensor is dequantized to float32 with `gguf` (numpy), brought to the Hugging Face [out, in] layout and then
placed through the same mappings and shardings as hf_import, one tensor at a time. Two GGUF conventions are undone:
llama.cpp names its tensors differently (token_embd, blk.N.attn_q, ...), and for the `llama` architecture its
converter interleaves the two RoPE halves of every q/k head's rows (llama.cpp rotates adjacent pairs; HF and we
rotate the halves), which `unpermute_rope_rows` reverses. Qwen2 / Qwen3 use the halves layout in llama.cpp too and
are stored unpermuted. A GGUF holds no value head: it gets a fresh init.

The tokenizer (byte-level BPE only) is rebuilt from the metadata as a `tokenizers` tokenizer.json plus a
tokenizer_config.json with the chat template and special tokens, so data/tokenizer.py loads it like any HF one.
Whatever the import cannot represent (another architecture, MoE, RoPE scaling, partial rotary, an integer or
unimplemented quantization type, an unknown pre-tokenizer) is a GGUFError naming the file and the field or tensor.
"""

import functools
import json
import os

import numpy as np

from lenvm_jax.model import hf_layout
from lenvm_jax.model.config import ModelConfig

GGUF_SUFFIX = ".gguf"

# general.architecture -> (q/k/v biases, q/k RMSNorm, q/k rows stored RoPE-interleaved by llama.cpp's converter).
ARCHITECTURES = {
    "llama": (False, False, True),
    "qwen2": (True, False, False),
    "qwen3": (False, True, False),
}

# HF tensor name (within a layer: after "model.layers.N.") -> llama.cpp's name (within "blk.N.").
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Byte-level BPE pre-tokenizers by tokenizer.ggml.pre: (regex split before the byte mapping or None for GPT-2's own,
# digits split one by one first, merges skipped for whole-vocabulary words). These restate the split rules of
# llama.cpp's pre-tokenizer types (and of the models' original tokenizer.json files).
_GPT2 = (None, False, False)
_PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": (None, True, False),  # StarCoder-style: each digit alone, then GPT-2's split.
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+", False, False),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+", False, True),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type).


class GGUFError(ValueError):
  """A GGUF file the import cannot represent faithfully; the CLIs report it as `error: ...`, exit 2."""


def is_gguf_path(path) -> bool:
  """True for a path ending in .gguf that is not a directory (a missing file then fails with a clear message)."""
  return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(GGUF_SUFFIX) \
      and not os.path.isdir(path)


@functools.lru_cache(maxsize=2)
def _cached_reader(real_path: str, mtime_ns: int, size: int):
  import gguf
  return gguf.GGUFReader(real_path)


def read_gguf(path: str):
  """gguf.GGUFReader of `path` (memory-mapped), parsed once per file version: config, weights and EOS share it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file")
  stat = os.stat(path)
  try:
    return _cached_reader(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
  except (ValueError, IndexError, KeyError) as e:  # Bad magic, an empty or truncated file.
    raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader, key: str, default=None):
  """A metadata value as Python (str, int, float, bool, or a list of them); `default` when absent."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _require(reader, path: str, key: str):
  value = metadata(reader, key)
  if value is None:
    raise GGUFError(f"{path}: metadata field {key} is missing")
  return value


def architecture(reader, path: str) -> str:
  name = _require(reader, path, "general.architecture")
  if name not in ARCHITECTURES:
    raise GGUFError(f"{path}: general.architecture is {name!r}; supported: {sorted(ARCHITECTURES)}")
  return name


def _tensors(reader) -> dict:
  return {t.name: t for t in reader.tensors}


def _int_field(reader, path: str, key: str, default=None) -> int:
  value = metadata(reader, key, default)
  if value is None:
    raise GGUFError(f"{path}: metadata field {key} is missing")
  if not isinstance(value, int) or isinstance(value, bool):  # An array: per-layer sizes, which we cannot hold.
    raise GGUFError(f"{path}: metadata field {key} is {value!r:.60}; a single integer is supported")
  return value


def _float32_value(value) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06), so it
  equals the value a run config or HF config.json writes."""
  return float(str(np.float32(value)))


def model_config_from_gguf(reader, path: str, **run_fields) -> ModelConfig:
  """ModelConfig of the file's metadata; `run_fields` sets the non-architecture fields (dtype, remat, dropout)."""
  arch = architecture(reader, path)
  qkv_bias, qk_norm, _ = ARCHITECTURES[arch]
  if (experts := metadata(reader, f"{arch}.expert_count", 0)):
    raise GGUFError(f"{path}: {arch}.expert_count is {experts}; mixture-of-experts models are not supported")
  scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise GGUFError(f"{path}: {arch}.rope.scaling.type is {scaling!r}; only plain RoPE is supported")
  hidden = _int_field(reader, path, f"{arch}.embedding_length")
  num_heads = _int_field(reader, path, f"{arch}.attention.head_count")
  num_kv_heads = _int_field(reader, path, f"{arch}.attention.head_count_kv", num_heads)
  head_dim = _int_field(reader, path, f"{arch}.attention.key_length", hidden // num_heads)
  for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
    if _int_field(reader, path, key, head_dim) != head_dim:  # Separate v size / partial rotary: not our trunk.
      raise GGUFError(f"{path}: {key} is {metadata(reader, key)} but the head size is {head_dim}; "
                      "only equal key / value / rotary sizes are supported")
  tensors = _tensors(reader)
  if "token_embd.weight" not in tensors:
    raise GGUFError(f"{path}: tensor token_embd.weight is missing")
  try:
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml order [hidden, rows]: the embedding rows.
        hidden_size=hidden, num_layers=_int_field(reader, path, f"{arch}.block_count"), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim,
        mlp_dim=_int_field(reader, path, f"{arch}.feed_forward_length"),
        rope_theta=_float32_value(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32_value(_require(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors, qkv_bias=qkv_bias, qk_norm=qk_norm, **run_fields)
  except ValueError as e:
    raise GGUFError(f"{path}: {e}") from None


def load_model_config(path: str, **run_fields) -> ModelConfig:
  return model_config_from_gguf(read_gguf(path), os.fspath(path), **run_fields)


def gguf_tensor_name(hf_name: str) -> str:
  """llama.cpp's name of an HF trunk tensor, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
  if hf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """HF -> llama.cpp: within each head, row i of the first half and row i of the second half become adjacent
  (the pairs llama.cpp rotates). What its converter does to Llama q/k weights; here to write test files."""
  rows = weight.shape[0]
  halves = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
  return np.ascontiguousarray(halves.swapaxes(1, 2)).reshape(weight.shape)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp -> HF: the inverse of permute_rope_rows (interleaved pairs back to the two RoPE halves per head)."""
  rows = weight.shape[0]
  pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
  return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(weight.shape)


def dequantize(tensor, path: str) -> np.ndarray:
  """A GGUF tensor as float32 in numpy order ([out, in] for a Linear weight: the HF layout)."""
  import gguf
  kind = tensor.tensor_type
  if kind.name in ("I8", "I16", "I32", "I64"):
    raise GGUFError(f"{path}: tensor {tensor.name} has type {kind.name}; integer tensors are not weights we can load")
  try:
    array = gguf.quants.dequantize(tensor.data, kind)
  except NotImplementedError:
    raise GGUFError(f"{path}: tensor {tensor.name} has quantization type {kind.name}, which gguf "
                    f"{_gguf_version()} cannot dequantize") from None
  shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dims innermost first.
  return np.asarray(array, np.float32).reshape(shape)


def _gguf_version() -> str:
  from importlib import metadata as package_metadata
  try:
    return package_metadata.version("gguf")
  except package_metadata.PackageNotFoundError:
    return "(unknown version)"


def hf_layout_tensor(reader, path: str, mapping: hf_layout.TensorMapping, model_config: ModelConfig) -> np.ndarray:
  """The tensor of `mapping` as the HF checkpoint holds it: dequantized, q/k RoPE rows un-interleaved for Llama."""
  name = gguf_tensor_name(mapping.hf_name)
  tensor = _tensors(reader).get(name)
  if tensor is None:
    raise GGUFError(f"{path}: tensor {name} (for {mapping.hf_name}) is missing")
  array = dequantize(tensor, path)
  if tuple(array.shape) != mapping.hf_shape:
    raise GGUFError(f"{path}: tensor {name} has shape {tuple(array.shape)}, expected {mapping.hf_shape}")
  if ARCHITECTURES[architecture(reader, path)][2]:
    for part, heads in ((".attn_q.", model_config.num_heads), (".attn_k.", model_config.num_kv_heads)):
      if part in name:
        array = unpermute_rope_rows(array, heads)
  return array


def load_params(path: str, model_config: ModelConfig, mesh, seed: int = 0) -> dict:
  """Params pure dict of `model_config`'s model from the GGUF file, sharded on `mesh` as hf_import shards them.

  Tensors the model has no place for (e.g. rope_freqs of Llama 3.1 scaling, MoE experts) are an error; the value
  head is a fresh init from `seed`.
  """
  from lenvm_jax.model import hf_import  # Lazy: hf_import imports this module to dispatch .gguf paths.

  path = os.fspath(path)
  reader = read_gguf(path)
  mappings = hf_layout.trunk_mappings(model_config)
  unexpected = sorted(set(_tensors(reader)) - {gguf_tensor_name(m.hf_name) for m in mappings})
  if unexpected:
    raise GGUFError(f"{path}: tensors with no place in the model: {unexpected[:8]}"
                    f"{' ...' if len(unexpected) > 8 else ''}")
  abstract, shardings = hf_import.abstract_params(model_config, mesh)
  params: dict = {}
  for m in mappings:
    target = hf_layout.get_path(abstract, m.path)
    ours = m.to_ours(hf_layout_tensor(reader, path, m, model_config).astype(target.dtype), target.shape)
    hf_layout.set_path(params, m.path, hf_import.place(ours, hf_layout.get_path(shardings, m.path)))
  params["value_head"] = hf_import.fresh_value_head(model_config, shardings, seed)
  return params


# ---------------------------------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
  kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  spelling = {b: chr(b) for b in kept}
  extra = 0
  for b in range(256):
    if b not in spelling:
      spelling[b] = chr(256 + extra)
      extra += 1
  return spelling


def _token_text(reader, token_id) -> str | None:
  tokens = metadata(reader, "tokenizer.ggml.tokens") or []
  return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def special_tokens(reader) -> dict[str, str]:
  """bos/eos/unk/pad token texts named by the metadata ids (those present)."""
  names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
  found = {name: _token_text(reader, metadata(reader, f"tokenizer.ggml.{key}")) for name, key in names.items()}
  return {name: text for name, text in found.items() if text is not None}


def build_tokenizer(reader, path: str):
  """A `tokenizers.Tokenizer` from the metadata: byte-level BPE, control tokens special, user-defined added."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

  kind = metadata(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
  pre = metadata(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {sorted(_PRE_TOKENIZERS)}")
  split, single_digits, ignore_merges = _PRE_TOKENIZERS[pre]
  tokens = _require(reader, path, "tokenizer.ggml.tokens")
  types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = _require(reader, path, "tokenizer.ggml.merges")

  spelling = _byte_alphabet()
  alphabet = set(spelling.values())
  # llama.cpp keeps byte-level spellings; a token with other characters (a mislabelled one) is respelled as bytes.
  spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
  vocab = {}
  for index, token in enumerate(spelled):
    vocab.setdefault(token, index)
  if len(vocab) != len(spelled):
    raise GGUFError(f"{path}: tokenizer.ggml.tokens has {len(spelled) - len(vocab)} duplicate tokens")
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                   ignore_merges=ignore_merges))
  steps = [pre_tokenizers.Digits(individual_digits=True)] if single_digits else []
  if split is None:
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
  else:
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
  tokenizer.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) must match whole in text, as llama.cpp and HF match them; a control token
  # spelled outside the byte alphabet would not be a real vocabulary entry (llama.cpp mislabel), so it is skipped.
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
                                if kind == _CONTROL and set(t) <= alphabet])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
                        if kind == _USER_DEFINED and t in vocab])
  return tokenizer


def tokenizer_config(reader) -> dict:
  """tokenizer_config.json: special token texts, BOS/EOS flags and the chat template, as HF names them."""
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(metadata(reader, "tokenizer.ggml.add_eos_token", False)), **special_tokens(reader)}
  template = metadata(reader, "tokenizer.chat_template")
  if template:
    config["chat_template"] = template
  return config


def _template_end_token(reader, template: str) -> int | None:
  """The control token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>, ...):
  decoding must stop there even when the metadata's EOS is another token."""
  from jinja2 import TemplateError

  from lenvm_jax.data import tokenizer as tokenizer_lib

  sentinel = "lenvm-message-end-probe"
  try:
    rendered = tokenizer_lib._compile_chat_template(template).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
        add_generation_prompt=False, tools=None, documents=None, **special_tokens(reader))
  except (TemplateError, TypeError, ValueError):  # A template that wants another conversation: no end token known.
    return None
  if sentinel not in rendered:
    return None
  after = rendered[rendered.rindex(sentinel) + len(sentinel):]
  tokens, types = metadata(reader, "tokenizer.ggml.tokens") or [], metadata(reader, "tokenizer.ggml.token_type") or []
  candidates = [(len(t), i) for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and t and
                after.startswith(t)]
  return max(candidates)[1] if candidates else None


def eos_ids(path: str) -> tuple[int, ...]:
  """Token ids that end a completion: tokenizer.ggml.eos_token_id, the end-of-turn id, and the chat template's
  end-of-message token when they differ (e.g. EOS <|endoftext|> but turns end with <|im_end|>)."""
  reader = read_gguf(path)
  ids = [metadata(reader, "tokenizer.ggml.eos_token_id"), metadata(reader, "tokenizer.ggml.eot_token_id")]
  template = metadata(reader, "tokenizer.chat_template")
  if template:
    ids.append(_template_end_token(reader, template))
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def write_tokenizer_files(path: str, output_dir: str) -> list[str]:
  """tokenizer.json + tokenizer_config.json of the GGUF's tokenizer in `output_dir`; returns the names written."""
  path = os.fspath(path)
  reader = read_gguf(path)
  os.makedirs(output_dir, exist_ok=True)
  build_tokenizer(reader, path).save(os.path.join(output_dir, "tokenizer.json"))
  with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer_config(reader), f, indent=2, ensure_ascii=False)
  return ["tokenizer.json", "tokenizer_config.json"]


def generation_config(path: str) -> dict:
  """generation_config.json of the file: its BOS / EOS / pad ids (EOS as eos_ids gives them)."""
  reader = read_gguf(path)
  config = {"eos_token_id": list(eos_ids(path))}
  for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
    value = metadata(reader, f"tokenizer.ggml.{key}")
    if value is not None:
      config[name] = int(value)
  return config
