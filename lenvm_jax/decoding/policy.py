"""A policy to sample from, placed on a mesh: a lenvm_jax run workdir or a Hugging Face causal-LM directory.

A workdir (config.json + checkpoints/) loads its latest checkpoint through infer/predict.py's Predictor; an HF
directory (config.json with `architectures`, safetensors) through model/hf_import.py. Runs do not know an EOS id
(training needs none), so for them it must come from the caller; HF directories name theirs in
generation_config.json or config.json (`eos_token_id`, an id or a list).
"""

import dataclasses
import json
import os

import jax

from lenvm_jax import sharding
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.model import hf_import
from lenvm_jax.model.config import ModelConfig
from lenvm_jax.train import state as state_lib


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


def load_policy(path: str, mesh) -> Policy:
  """The policy at `path` with its parameters sharded on `mesh` by their logical axes."""
  if is_run_workdir(path):
    predictor = Predictor(path)
    model_config = ModelConfig.from_config(predictor.config.model)
    graphdef, abstract = state_lib.abstract_model(model_config)
    with jax.set_mesh(mesh):
      params = jax.device_put(predictor.params, sharding.param_shardings(abstract, mesh))
    return Policy(graphdef, params, model_config, (), f"run {path} step {predictor.step}")
  if os.path.isfile(os.path.join(path, "config.json")):
    model_config = hf_import.load_model_config(path)
    graphdef, _ = state_lib.abstract_model(model_config)
    with jax.set_mesh(mesh):
      params = hf_import.load_params(path, model_config, mesh)
    return Policy(graphdef, params, model_config, hf_eos_ids(path), f"hf {path}")
  raise FileNotFoundError(f"{path}: neither a run workdir (no checkpoints/) nor a Hugging Face directory "
                          "(no config.json)")
