"""Text -> token ids exactly as the generator saw them, so imported lengths count the generator's own tokens.

load_tokenizer(path) takes
  - a Hugging Face tokenizer.json file: no chat template, the plain default below;
  - a Hugging Face tokenizer directory: tokenizer.json plus tokenizer_config.json, whose `chat_template` (or a
    chat_template.jinja file), `eos_token` and `bos_token` are used;
  - a SentencePiece model file (e.g. tokenizer.model): Mistral v1 instruct format;
  - a llama.cpp .gguf file: its byte-level BPE tokenizer and chat template, rebuilt from the metadata as a
    tokenizer.json + tokenizer_config.json (below; the file is read through lenvm_jax/gguf_file.py), then loaded as a
    directory.

Default prompt formats, used only when no chat template is given:
  SentencePiece   BOS "[INST] {system}\\n\\n{user} [/INST]"; earlier assistant turns are "{text}" EOS (Mistral v1)
  tokenizer.json  "{role}: {content}\\n" per message, then "assistant:"

The EOS id is the tokenizer_config eos_token, else the first of _EOS_NAMES in the vocabulary (SentencePiece: the
model's eos id). A tokenizer without one raises ValueError: finished completions must end with EOS.
"""

import json
import os

from lenvm_jax import files
from lenvm_jax.data import chat_template as chat_template_lib
from lenvm_jax.gguf_file import GGUF_SUFFIX, GGUFError, metadata, read_gguf, require_field

ROLES = ("system", "user", "assistant")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>")


class Tokenizer:
  """encode() adds no special tokens; prompt_ids() renders the chat prompt the way the generator server did."""

  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def prompt_ids(self, messages: list[dict]) -> list[int]:
    """The chat prompt with the generation prompt; ValueError if the messages or template reject it."""
    raise NotImplementedError

  def completion_ids(self, text: str, finished: bool = True) -> list[int]:
    """A completion stopped by the length limit has no EOS; a finished one ends with it."""
    return self.encode(text) + ([self.eos_id] if finished else [])


def _check_messages(messages: list[dict]) -> None:
  for message in messages:
    if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
      raise ValueError(f"a message needs role in {ROLES} and string content, got {message!r:.80}")


def _token_text(token) -> str | None:
  """tokenizer_config special tokens are strings or AddedToken dicts ({"content": ...})."""
  if isinstance(token, dict):
    token = token.get("content")
  return token if isinstance(token, str) else None


class HuggingFaceTokenizer(Tokenizer):
  """A `tokenizers` tokenizer.json, with the chat template and special tokens of its tokenizer_config.json."""

  def __init__(self, tokenizer_json: str, config: dict | None = None, chat_template: str | None = None):
    from tokenizers import Tokenizer as RustTokenizer
    self.path = tokenizer_json
    self._tokenizer = RustTokenizer.from_file(tokenizer_json)
    config = config or {}
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    # Every *_token of the config is visible to the template (bos_token, eos_token, pad_token, ...), as in HF.
    self._special_tokens = {k: _token_text(v) for k, v in config.items()
                            if k.endswith("_token") and _token_text(v) is not None}
    self.eos_id = self._find_eos(self._special_tokens.get("eos_token"))
    self.chat_template = chat_template
    self._template = None
    if chat_template:
      from jinja2 import TemplateError
      try:
        self._template = chat_template_lib.compile_template(chat_template)
      except TemplateError as e:
        raise ValueError(f"{os.path.dirname(tokenizer_json)}: chat template does not parse: {e}") from None

  def _find_eos(self, configured: str | None) -> int:
    if configured is not None:
      eos_id = self._tokenizer.token_to_id(configured)
      if eos_id is None:
        raise ValueError(f"{self.path}: eos_token {configured!r} of tokenizer_config.json is not in the vocabulary")
      return eos_id
    for name in _EOS_NAMES:
      eos_id = self._tokenizer.token_to_id(name)
      if eos_id is not None:
        return eos_id
    raise ValueError(f"{self.path}: no EOS token: set eos_token in tokenizer_config.json (none of {_EOS_NAMES} "
                     "is in the vocabulary)")

  def encode(self, text: str) -> list[int]:
    # Special tokens written in the text (e.g. <|im_start|> from a template) still map to their ids.
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  def render_prompt(self, messages: list[dict]) -> str:
    _check_messages(messages)
    if self._template is None:
      return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from jinja2 import TemplateError
    try:
      return self._template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                   **self._special_tokens)
    except TemplateError as e:  # e.g. raise_exception("roles must alternate"): the conversation, not the code.
      raise ValueError(f"chat template: {e}") from None

  def prompt_ids(self, messages: list[dict]) -> list[int]:
    return self.encode(self.render_prompt(messages))


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; prompts in the Mistral v1 instruct format (as mistral-common encodes them)."""

  def __init__(self, model_path: str):
    import sentencepiece
    self.path = model_path
    self._model = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._model.get_piece_size()
    self.eos_id = self._model.eos_id()
    if self.eos_id < 0:
      raise ValueError(f"{model_path}: the SentencePiece model has no EOS id")
    self.bos_id = self._model.bos_id()

  def encode(self, text: str) -> list[int]:
    return self._model.encode(text)

  def decode(self, ids) -> str:
    return self._model.decode(list(ids))

  def prompt_ids(self, messages: list[dict]) -> list[int]:
    _check_messages(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    ids = [self.bos_id] if self.bos_id >= 0 else []
    first_user = True
    for message in messages:
      if message["role"] == "user":
        content = f"{system}\n\n{message['content']}" if first_user and system else message["content"]
        ids += self.encode(f"[INST] {content} [/INST]")
        first_user = False
      elif message["role"] == "assistant":
        ids += self.encode(message["content"]) + [self.eos_id]
    return ids


# A GGUF file's tokenizer: byte-level BPE (rebuilt with `tokenizers`) and chat template, written as HF files;
# whatever cannot be represented (another tokenizer model, an unknown pre-tokenizer) is a GGUFError naming the field.

# Byte-level BPE pre-tokenizers by tokenizer.ggml.pre: (regex split before the byte mapping or None for GPT-2's own,
# digits split one by one first, merges skipped for whole-vocabulary words). These restate the split rules of
# llama.cpp's pre-tokenizer types (and of the models' original tokenizer.json files).
_GPT2 = (None, False, False)
_GGUF_PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": (None, True, False),  # StarCoder-style: each digit alone, then GPT-2's split.
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+", False, False),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+", False, True),
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type).


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


def _gguf_token_text(reader, token_id) -> str | None:
  tokens = metadata(reader, "tokenizer.ggml.tokens") or []
  return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def gguf_special_tokens(reader) -> dict[str, str]:
  """bos/eos/unk/pad token texts named by the metadata ids (those present)."""
  names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
  found = {name: _gguf_token_text(reader, metadata(reader, f"tokenizer.ggml.{key}")) for name, key in names.items()}
  return {name: text for name, text in found.items() if text is not None}


def build_gguf_tokenizer(reader, path: str):
  """A `tokenizers.Tokenizer` from the metadata: byte-level BPE, control tokens special, user-defined added."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

  kind = metadata(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
  pre = metadata(reader, "tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE_TOKENIZERS:
    raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {sorted(_GGUF_PRE_TOKENIZERS)}")
  split, single_digits, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]
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
                                if kind == _GGUF_CONTROL and set(t) <= alphabet])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
                        if kind == _GGUF_USER_DEFINED and t in vocab])
  return tokenizer


def gguf_tokenizer_config(reader) -> dict:
  """tokenizer_config.json: special token texts, BOS/EOS flags and the chat template, as HF names them."""
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(metadata(reader, "tokenizer.ggml.add_eos_token", False)),
            **gguf_special_tokens(reader)}
  template = metadata(reader, "tokenizer.chat_template")
  if template:
    config["chat_template"] = template
  return config


def _gguf_template_end_token(reader, template: str) -> int | None:
  """The control token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>, ...):
  decoding must stop there even when the metadata's EOS is another token."""
  from jinja2 import TemplateError

  sentinel = "lenvm-message-end-probe"
  try:
    rendered = chat_template_lib.compile_template(template).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
        add_generation_prompt=False, tools=None, documents=None, **gguf_special_tokens(reader))
  except (TemplateError, TypeError, ValueError):  # A template that wants another conversation: no end token known.
    return None
  if sentinel not in rendered:
    return None
  after = rendered[rendered.rindex(sentinel) + len(sentinel):]
  tokens, types = metadata(reader, "tokenizer.ggml.tokens") or [], metadata(reader, "tokenizer.ggml.token_type") or []
  candidates = [(len(t), i) for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _GGUF_CONTROL and t and
                after.startswith(t)]
  return max(candidates)[1] if candidates else None


def gguf_eos_ids(path: str) -> tuple[int, ...]:
  """Token ids that end a completion: tokenizer.ggml.eos_token_id, the end-of-turn id, and the chat template's
  end-of-message token when they differ (e.g. EOS <|endoftext|> but turns end with <|im_end|>)."""
  reader = read_gguf(path)
  ids = [metadata(reader, "tokenizer.ggml.eos_token_id"), metadata(reader, "tokenizer.ggml.eot_token_id")]
  template = metadata(reader, "tokenizer.chat_template")
  if template:
    ids.append(_gguf_template_end_token(reader, template))
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def write_gguf_tokenizer_files(path: str, output_dir: str) -> list[str]:
  """tokenizer.json, tokenizer_config.json and generation_config.json of the GGUF's tokenizer in `output_dir`
  (what an HF directory holds besides weights); returns the names written."""
  path = os.fspath(path)
  reader = read_gguf(path)
  os.makedirs(output_dir, exist_ok=True)
  with files.atomic_path(os.path.join(output_dir, "tokenizer.json")) as tmp:  # Links at these names are replaced.
    build_gguf_tokenizer(reader, path).save(tmp)
  files.write_atomic(os.path.join(output_dir, "tokenizer_config.json"),
                     json.dumps(gguf_tokenizer_config(reader), indent=2, ensure_ascii=False))
  files.write_atomic(os.path.join(output_dir, "generation_config.json"),
                     json.dumps(gguf_generation_config(path), indent=2))
  return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def gguf_generation_config(path: str) -> dict:
  """generation_config.json of the file: its BOS / EOS / pad ids (EOS as eos_ids gives them)."""
  reader = read_gguf(path)
  config = {"eos_token_id": list(gguf_eos_ids(path))}
  for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
    value = metadata(reader, f"tokenizer.ggml.{key}")
    if value is not None:
      config[name] = int(value)
  return config


def _load_gguf_tokenizer(path: str) -> HuggingFaceTokenizer:
  """The GGUF's tokenizer files are written to a temporary directory only long enough to load them."""
  import tempfile

  with tempfile.TemporaryDirectory(prefix="gguf_tokenizer_") as directory:
    write_gguf_tokenizer_files(path, directory)
    tokenizer = load_tokenizer(directory)
  tokenizer.path = path
  return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
  if os.path.isdir(path):
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
      raise ValueError(f"{path}: no tokenizer.json (a fast HF tokenizer is needed; for a SentencePiece model pass "
                       "its .model file)")
    config = {}
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return HuggingFaceTokenizer(tokenizer_json, config, chat_template_lib.read_template(path, config))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer at {path!r}")
  if path.lower().endswith(GGUF_SUFFIX):
    return _load_gguf_tokenizer(path)
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{path}: not a tokenizer.json, an HF tokenizer directory, or a SentencePiece model ({e})") \
        from None
