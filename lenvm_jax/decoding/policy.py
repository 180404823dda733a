"""A policy to sample from, placed on a mesh: a lenvm_jax run workdir or a Hugging Face causal-LM directory.

A workdir (config.json + checkpoints/) loads its latest checkpoint's weights through
checkpoint_restore.restore_params; an HF directory (config.json with `architectures`, safetensors) through
model/hf_import.py. A run's EOS ids come from the caller (--eos_ids, --tokenizer), else from its config.json's record
(run/eos.py); HF directories name theirs in generation_config.json or config.json (`eos_token_id`, an id or a
list). A llama.cpp `.gguf` file loads through model/gguf_import.py; its EOS ids are the metadata's EOS plus the chat
template's end-of-turn token.
"""

import dataclasses
import json
import os

import jax

from lenvm_jax import gguf_file
from lenvm_jax.run import checkpoint_restore, config_history, eos as run_eos
from lenvm_jax.data import tokenizer as tokenizer_lib
from lenvm_jax.model import hf_import
from lenvm_jax.model_config import ModelConfig
from lenvm_jax.model.transformer import abstract_model


@dataclasses.dataclass(frozen=True)
class Policy:
  graphdef: object
  params: dict
  model_config: ModelConfig
  eos_ids: tuple[int, ...]  # Empty when the source names none.
  description: str  # Where it came from, for generation.json.


def is_run_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def hf_eos_ids(directory: str) -> tuple[int, ...]:
  for name in ("generation_config.json", "config.json"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
      if eos is not None:
        return tuple(eos) if isinstance(eos, list) else (eos,)
  return ()


def read_model_config(path: str) -> ModelConfig:
  """The policy's shape (vocabulary included) without its weights: relations between flags (the LenVM's vocabulary,
  EOS ids) are checked before anything heavy loads."""
  if is_run_workdir(path):
    return config_history.read_config(path).model
  if gguf_file.is_gguf_path(path) or os.path.isfile(os.path.join(path, "config.json")):
    return hf_import.load_model_config(path)
  raise FileNotFoundError(f"{path}: neither a run workdir (no checkpoints/), a Hugging Face directory "
                          "(no config.json) nor a .gguf file")


def load_policy(path: str, mesh) -> Policy:
  """The policy at `path` with its parameters sharded on `mesh` by their logical axes."""
  model_config = read_model_config(path)
  graphdef, abstract = abstract_model(model_config)
  if is_run_workdir(path):
    with jax.set_mesh(mesh):
      params, step = checkpoint_restore.restore_params(path, checkpoint_restore.abstract_params_on(abstract, mesh))
    return Policy(graphdef, params, model_config, (), f"run {path} step {step}")
  with jax.set_mesh(mesh):
    params = hf_import.load_params(path, model_config, mesh)
  return Policy(graphdef, params, model_config, read_eos_ids(path),
                f"{'gguf' if gguf_file.is_gguf_path(path) else 'hf'} {path}")


def read_eos_ids(path: str) -> tuple[int, ...]:
  """The EOS ids the policy's files name (none for a run: a caller's tokenizer comes first, then the run's own,
  run/eos.py), read without its weights."""
  if is_run_workdir(path):
    return ()
  return tuple(tokenizer_lib.gguf_eos_ids(path)) if gguf_file.is_gguf_path(path) else hf_eos_ids(path)


def run_eos_ids(path: str) -> tuple[int, ...]:
  """A run workdir's own EOS ids (run/eos.py: its config.json's record; a synthetic run's id); () for the rest."""
  return run_eos.run_eos_ids(path) if is_run_workdir(path) else ()
