"""Text -> token ids exactly as the generator saw them, so imported lengths count the generator's own tokens.

load_tokenizer(path) takes
  - a Hugging Face tokenizer.json file: no chat template, the plain default below;
  - a Hugging Face tokenizer directory: tokenizer.json plus tokenizer_config.json, whose `chat_template` (or a
    chat_template.jinja file), `eos_token` and `bos_token` are used;
  - a SentencePiece model file (e.g. tokenizer.model): Mistral v1 instruct format;
  - a llama.cpp .gguf file: its byte-level BPE tokenizer and chat template, rebuilt from the metadata as a
    tokenizer.json + tokenizer_config.json (data/gguf_file.py), then loaded as a directory.

Default prompt formats, used only when no chat template is given:
  SentencePiece   BOS "[INST] {system}\\n\\n{user} [/INST]"; earlier assistant turns are "{text}" EOS (Mistral v1)
  tokenizer.json  "{role}: {content}\\n" per message, then "assistant:"

The EOS id is the tokenizer_config eos_token, else the first of _EOS_NAMES in the vocabulary (SentencePiece: the
model's eos id). A tokenizer without one raises ValueError: finished completions must end with EOS.
"""

import datetime
import json
import os

from lenvm_jax.data import gguf_file

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


def _compile_chat_template(source: str):
  """Sandboxed Jinja like transformers' apply_chat_template: trim/lstrip blocks, loop controls, raise_exception,
  tojson, strftime_now, and the {% generation %} block (it marks assistant text for training masks; rendering
  keeps its body as is)."""
  from jinja2 import TemplateError, nodes
  from jinja2.ext import Extension, loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationBlock(Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


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
        self._template = _compile_chat_template(chat_template)
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


def _read_chat_template(directory: str, config: dict) -> str | None:
  """chat_template.jinja, else tokenizer_config's chat_template (a string, or a list of named templates)."""
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def _load_gguf_tokenizer(path: str) -> HuggingFaceTokenizer:
  """The GGUF's tokenizer files are written to a temporary directory only long enough to load them."""
  import tempfile

  with tempfile.TemporaryDirectory(prefix="gguf_tokenizer_") as directory:
    gguf_file.write_tokenizer_files(path, directory)
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
    return HuggingFaceTokenizer(tokenizer_json, config, _read_chat_template(path, config))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer at {path!r}")
  if path.lower().endswith(".gguf"):
    return _load_gguf_tokenizer(path)
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{path}: not a tokenizer.json, an HF tokenizer directory, or a SentencePiece model ({e})") \
        from None
