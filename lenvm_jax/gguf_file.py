"""A llama.cpp GGUF file read without the model stack: the memory-mapped reader (parsed once per file version) and
its metadata fields.

Both halves of a GGUF import read through it: the weights (model/gguf_import.py) and the tokenizer rebuilt from the
metadata (data/tokenizer.py). Whatever a file lacks is a GGUFError naming the file and the field.
"""

import functools
import os

GGUF_SUFFIX = ".gguf"


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
