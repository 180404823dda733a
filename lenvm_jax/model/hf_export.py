"""Write LengthValueModel params as a LenVM in the reference interchange layout (docs/method.md §12).

An HF causal-LM directory (config.json of the matching Llama / Qwen2 / Qwen3 class, model.safetensors written
with safetensors.numpy, no torch) plus value_head.safetensors with the `v_head.*` tensors in PyTorch [out, in]
layout. Tokenizer and generation files are copied from a source HF directory when one is known.

Weights above `max_shard_bytes` are split as `save_pretrained` splits them: model-0000i-of-0000n.safetensors plus
model.safetensors.index.json. Each shard is fetched from the devices and written before the next, so the host holds
one shard, not the model.

An export's output directory is checked before anything loads (check_export_dir: never a run directory, a non-empty
one only with --overwrite) and emptied only once the model has loaded (remove_entries).
"""

import json
import os
import re
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from lenvm_jax import files, gguf_file
from lenvm_jax.errors import UserError
from lenvm_jax.data import tokenizer as tokenizer_lib
from lenvm_jax.model import hf_config, hf_import, hf_layout
from lenvm_jax.model_config import ModelConfig

# Files of an HF directory that describe tokenization and decoding, not weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# transformers refuses safetensors files whose metadata does not name a framework layout; ours is PyTorch's.
_METADATA = {"format": "pt"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB").
# A training run's directory (run/checkpoint_layout.py, run/workdir_lock.py) is never an export's output.
RUN_DIR_CHECKPOINTS, RUN_DIR_LOCK = "checkpoints", ".lock"


def _host_tensors(mappings, params: dict) -> dict[str, np.ndarray]:
  return {m.hf_name: m.to_hf(np.asarray(jax.device_get(hf_layout.get_param(params, m)), np.float32))
          for m in mappings}


def copy_tokenizer_files(source_dir: str, output_dir: str) -> list[str]:
  """Copies the tokenizer / generation files that `source_dir` has (or rebuilds them from a `.gguf` file's
  metadata); returns their names."""
  if gguf_file.is_gguf_path(source_dir):
    return tokenizer_lib.write_gguf_tokenizer_files(source_dir, output_dir)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source_dir, name)):
      with open(os.path.join(source_dir, name), "rb") as f:
        files.write_atomic(os.path.join(output_dir, name), f.read())
      copied.append(name)
  return copied


def _shards(mappings, max_shard_bytes: int) -> list[list]:
  """Mappings grouped in file order into shards of at most max_shard_bytes of float32 (a bigger tensor: alone)."""
  shards, size = [[]], 0
  for m in mappings:
    nbytes = 4 * int(np.prod(m.hf_shape))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(m)
    size += nbytes
  return shards


def _save(tensors: dict, path: str, metadata: dict):
  """A safetensors file written through an exclusive temporary beside it (files.atomic_path): a symlink planted at
  `path` is replaced, never followed, and a reader never sees half a file."""
  with files.atomic_path(path) as tmp:
    save_file(tensors, tmp, metadata=metadata)


def save_trunk(params: dict, model_config: ModelConfig, output_dir: str, max_shard_bytes: int) -> list[str]:
  for name in os.listdir(output_dir):  # A re-export must not leave the other layout's weights to be read instead.
    if name in (hf_import.SINGLE_FILE, hf_import.INDEX_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
      os.remove(os.path.join(output_dir, name))
  shards = _shards(hf_layout.trunk_mappings(model_config), max_shard_bytes)
  if len(shards) == 1:
    _save(_host_tensors(shards[0], params), os.path.join(output_dir, hf_import.SINGLE_FILE), _METADATA)
    return [hf_import.SINGLE_FILE]
  names, weight_map, total = [], {}, 0
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = _host_tensors(shard, params)
    _save(tensors, os.path.join(output_dir, name), _METADATA)
    weight_map.update({hf_name: name for hf_name in tensors})
    total += sum(t.nbytes for t in tensors.values())
    names.append(name)
  files.write_atomic(os.path.join(output_dir, hf_import.INDEX_FILE),
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return names + [hf_import.INDEX_FILE]


def export(params: dict, model_config: ModelConfig, output_dir: str, tokenizer_dir: str = "",
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes the LenVM directory; returns the file names written. float32 weights, whatever the training dtype."""
  os.makedirs(output_dir, exist_ok=True)
  written = []
  files.write_atomic(os.path.join(output_dir, "config.json"),
                     json.dumps(hf_config.hf_config_from_model_config(model_config), indent=2, sort_keys=True))
  written.append("config.json")
  written += save_trunk(params, model_config, output_dir, max_shard_bytes)
  _save(_host_tensors(hf_layout.value_head_mappings(model_config), params),
        os.path.join(output_dir, hf_layout.VALUE_HEAD_FILE), _METADATA)
  written.append(hf_layout.VALUE_HEAD_FILE)
  candidate_file = os.path.join(output_dir, hf_layout.CANDIDATE_HEAD_FILE)
  if model_config.candidate_head != "none":
    _save(_host_tensors(hf_layout.candidate_head_mappings(model_config), params), candidate_file,
          {**_METADATA, "candidate_head": model_config.candidate_head})
    written.append(hf_layout.CANDIDATE_HEAD_FILE)
  elif os.path.exists(candidate_file):  # A re-export without the head must not leave the old one to be read.
    os.remove(candidate_file)
  if tokenizer_dir:
    written += copy_tokenizer_files(tokenizer_dir, output_dir)
  return written


def check_export_dir(output: str, overwrite: bool) -> list[str]:
  """For an export of a model (experiments/export_hf.py, convert_gguf.py): the entries a non-empty output holds (to
  remove once the model has loaded); refuses a file, a run directory, or, without `overwrite`, any non-empty
  directory."""
  where = f"--output={output}"
  if os.path.exists(output) and not os.path.isdir(output):
    raise UserError.at("the output is a file", where, "give a directory")
  entries = sorted(os.listdir(output)) if os.path.isdir(output) else []
  if not entries:
    return []
  if os.path.isdir(os.path.join(output, RUN_DIR_CHECKPOINTS)) or RUN_DIR_LOCK in entries:
    raise UserError.at("the output is a training run directory", where, "export into another directory")
  if not overwrite:
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise UserError.at(f"the output directory is not empty ({shown})", where,
                       "choose a new or empty directory, or pass --overwrite to replace its contents")
  return entries


def remove_entries(directory: str, names: list[str]) -> None:
  """Removes `names` (files, links or directories) from `directory`: what check_export_dir allowed --overwrite to
  replace, once the new model has loaded. A link is removed, never followed."""
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
