"""A llama.cpp GGUF file read without the model stack: its metadata, and the tokenizer it carries rebuilt as a
Hugging Face tokenizer.json + tokenizer_config.json (+ generation_config.json), so data/tokenizer.py loads it like
any HF tokenizer and model/gguf_import.py reads the weights through the same reader.

The tokenizer (byte-level BPE only) is rebuilt from the metadata with `tokenizers`; whatever cannot be represented
(another tokenizer model, an unknown pre-tokenizer) is a GGUFError naming the file and the field.
"""

import functools
import json
import os

from lenvm_jax import files

GGUF_SUFFIX = ".gguf"

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


def require_field(reader, path: str, key: str):
  """The metadata value at `key`, or a GGUFError naming the file and the field."""
  value = metadata(reader, key)
  if value is None:
    raise GGUFError(f"{path}: metadata field {key} is missing")
  return value


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
  tokens = require_field(reader, path, "tokenizer.ggml.tokens")
  types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = require_field(reader, path, "tokenizer.ggml.merges")

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
  """tokenizer.json, tokenizer_config.json and generation_config.json of the GGUF's tokenizer in `output_dir`
  (what an HF directory holds besides weights); returns the names written."""
  path = os.fspath(path)
  reader = read_gguf(path)
  os.makedirs(output_dir, exist_ok=True)
  with files.atomic_path(os.path.join(output_dir, "tokenizer.json")) as tmp:  # Links at these names are replaced.
    build_tokenizer(reader, path).save(tmp)
  files.write_atomic(os.path.join(output_dir, "tokenizer_config.json"),
                     json.dumps(tokenizer_config(reader), indent=2, ensure_ascii=False))
  files.write_atomic(os.path.join(output_dir, "generation_config.json"), json.dumps(generation_config(path), indent=2))
  return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def generation_config(path: str) -> dict:
  """generation_config.json of the file: its BOS / EOS / pad ids (EOS as eos_ids gives them)."""
  reader = read_gguf(path)
  config = {"eos_token_id": list(eos_ids(path))}
  for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
    value = metadata(reader, f"tokenizer.ggml.{key}")
    if value is not None:
      config[name] = int(value)
  return config
