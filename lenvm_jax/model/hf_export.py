"""Write LengthValueModel params as a LenVM in the reference interchange layout (spec section 6).

An HF causal-LM directory (config.json of the matching Llama / Qwen2 / Qwen3 class, model.safetensors written
with safetensors.numpy, no torch) plus value_head.safetensors with the `v_head.*` tensors in PyTorch [out, in]
layout. Tokenizer and generation files are copied from a source HF directory when one is known.
"""

import json
import os
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from lenvm_jax.model import hf_config, hf_layout
from lenvm_jax.model.config import ModelConfig

# Files of an HF directory that describe tokenization and decoding, not weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# transformers refuses safetensors files whose metadata does not name a framework layout; ours is PyTorch's.
_METADATA = {"format": "pt"}


def _host_tensors(mappings, params: dict) -> dict[str, np.ndarray]:
  return {m.hf_name: m.to_hf(np.asarray(jax.device_get(hf_layout.get_path(params, m.path)), np.float32))
          for m in mappings}


def copy_tokenizer_files(source_dir: str, output_dir: str) -> list[str]:
  """Copies the tokenizer / generation files that `source_dir` has; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(output_dir, name))
      copied.append(name)
  return copied


def export(params: dict, model_config: ModelConfig, output_dir: str, tokenizer_dir: str = "") -> list[str]:
  """Writes the LenVM directory; returns the file names written. float32 weights, whatever the training dtype."""
  os.makedirs(output_dir, exist_ok=True)
  written = []
  with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config.hf_config_from_model_config(model_config), f, indent=2, sort_keys=True)
  written.append("config.json")
  save_file(_host_tensors(hf_layout.trunk_mappings(model_config), params),
            os.path.join(output_dir, "model.safetensors"), metadata=_METADATA)
  written.append("model.safetensors")
  save_file(_host_tensors(hf_layout.value_head_mappings(model_config), params),
            os.path.join(output_dir, hf_layout.VALUE_HEAD_FILE), metadata=_METADATA)
  written.append(hf_layout.VALUE_HEAD_FILE)
  if tokenizer_dir:
    written += copy_tokenizer_files(tokenizer_dir, output_dir)
  return written
