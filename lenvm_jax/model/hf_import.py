"""Load a Hugging Face causal-LM directory (Llama / Qwen2 / Qwen3) into LengthValueModel params on a mesh.

Tensors are read one at a time (safetensors `safe_open`, numpy) and each is placed straight onto its sharding
(model/placement.py: a decoder layer's into its slice of the stacked array, on the devices), so the host holds at
most one full tensor, never a second copy of the model. A file that is damaged, truncated, of other shapes, or an
index that names files outside the directory is a ModelFileError naming the file. A `value_head.safetensors` (a
LenVM in the reference layout, docs/method.md §12) supplies the value head; without one it gets a fresh init. Every
function that takes a directory also takes a llama.cpp `.gguf` file (model/gguf_import.py), and check_run_matches
compares a run's model with either (model.init_from).
"""

import contextlib
import json
import os

import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy, so bf16 checkpoints read through safetensors.numpy.
from safetensors import SafetensorError, safe_open

from lenvm_jax import files as files_lib, gguf_file
from lenvm_jax.errors import ModelFileError, UserError
from lenvm_jax.model import gguf_import, hf_config, hf_layout, placement
from lenvm_jax.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


_FIX = "the file is damaged or incomplete: copy or download it again"


@contextlib.contextmanager
def reading(path: str):
  """Inside, what a safetensors / JSON reader says about `path` (damaged, truncated, missing) is a ModelFileError
  that names it."""
  try:
    yield
  except UserError:
    raise
  except SafetensorError as e:
    raise ModelFileError.at(f"not a readable safetensors file ({e})", path, _FIX) from None
  except json.JSONDecodeError as e:
    raise ModelFileError.at(f"not valid JSON ({e})", path, _FIX) from None
  except OSError as e:  # Missing, a directory, unreadable, or an I/O error of the device.
    raise ModelFileError.at(f"cannot read it ({e.strerror.lower() if e.strerror else e})", path,
                            "check that the model directory is complete and readable") from None


def _safe_open(stack: contextlib.ExitStack, path: str):
  with reading(path):
    return stack.enter_context(safe_open(path, framework="numpy"))


def _names(path: str) -> set[str]:
  with contextlib.ExitStack() as stack:
    return set(_safe_open(stack, path).keys())


def tensor_files(directory: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file that holds it (single file, or sharded files + index). The index's file
  names must lie inside the directory."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index_path):
    with reading(index_path), open(index_path, encoding="utf-8") as f:
      index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise ModelFileError.at("no 'weight_map' object", index_path, _FIX)
    return {name: files_lib.inside(directory, file, f"{index_path}: weight_map[{name!r}]")
            for name, file in weight_map.items()}
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(single):
    return {name: single for name in _names(single)}
  raise ModelFileError.at(f"neither {SINGLE_FILE} nor {INDEX_FILE} found", directory,
                          "give a Hugging Face directory with safetensors weights (only those are supported)")


def _load_mapped(mappings, files: dict[str, str], abstract: dict, shardings: dict) -> dict:
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {}
    for m in mappings:
      if m.hf_name not in files:
        shown = sorted(set(files.values()))
        raise ModelFileError.at(f"tensor {m.hf_name!r} is missing", ", ".join(shown[:3]) + (" ..." if len(shown) > 3
                                                                                             else ""),
                                "the weights are incomplete or of another architecture than config.json says")
      path = files[m.hf_name]
      if path not in handles:
        handles[path] = _safe_open(stack, path)
      with reading(path):
        tensor = handles[path].get_tensor(m.hf_name)
      if tuple(tensor.shape) != m.hf_shape:
        raise ModelFileError.at(f"tensor {m.hf_name} has shape {tuple(tensor.shape)}, the model expects "
                                f"{m.hf_shape}", path, "the file does not belong to this model's config.json")
      placement.put_mapped(params, m, tensor, abstract, shardings)
      del tensor
  return params


def _ignorable(name: str, model_config: ModelConfig) -> bool:
  """Tensors some checkpoints carry that hold nothing we need: RoPE tables, a tied LM head's duplicate."""
  return name.endswith("rotary_emb.inv_freq") or (model_config.tie_embeddings and name == "lm_head.weight")


def has_value_head(directory: str) -> bool:
  """Whether the directory carries a value head (anything at its name: a directory there is an error when read, not
  a silent fresh head)."""
  if gguf_file.is_gguf_path(directory):  # A GGUF file is a plain LM: never a value head.
    return False
  return os.path.lexists(os.path.join(directory, hf_layout.VALUE_HEAD_FILE))


def candidate_head_kind(directory: str) -> str:
  """The candidate head an HF dir carries ("table" / "tied", from candidate_head.safetensors), or "none"."""
  path = os.path.join(directory, hf_layout.CANDIDATE_HEAD_FILE)
  if gguf_file.is_gguf_path(directory) or not os.path.isfile(path):
    return "none"
  with contextlib.ExitStack() as stack:
    f = _safe_open(stack, path)
    kind = (f.metadata() or {}).get("candidate_head")
    return kind or ("table" if "c_head.table.weight" in f.keys() else "tied")


def load_candidate_head(directory: str, model_config: ModelConfig, abstract: dict, shardings: dict, seed: int):
  """The model's candidate head from candidate_head.safetensors (exactly its tensors), else a fresh init."""
  path = os.path.join(directory, hf_layout.CANDIDATE_HEAD_FILE)
  if candidate_head_kind(directory) == "none":
    return placement.fresh_candidate_head(model_config, shardings, seed)
  mappings = hf_layout.candidate_head_mappings(model_config)
  names = _names(path)
  if names != {m.hf_name for m in mappings}:
    raise ModelFileError.at(f"holds {sorted(names)}, expected exactly {sorted(m.hf_name for m in mappings)} for "
                            f"model.candidate_head={model_config.candidate_head!r}", path,
                            "give the candidate head exported with this model")
  return _load_mapped(mappings, {n: path for n in names}, abstract, shardings)["candidate_head"]


def load_params(directory: str, model_config: ModelConfig, mesh, seed: int = 0) -> dict:
  """Params pure dict of `model_config`'s model from the HF dir, every leaf sharded on `mesh` by its logical axes.

  Tensors the model has no place for are an error (an unsupported feature such as an o_proj bias would otherwise
  be dropped silently). Without value_head.safetensors the value head is a fresh init from `seed`.
  A `.gguf` file instead of a directory loads through gguf_import.
  """
  if gguf_file.is_gguf_path(directory):
    return gguf_import.load_params(directory, model_config, mesh, seed)
  abstract, shardings = placement.abstract_params(model_config, mesh)

  files = tensor_files(directory)
  mappings = hf_layout.trunk_mappings(model_config)
  unexpected = sorted(set(files) - {m.hf_name for m in mappings} - {n for n in files if _ignorable(n, model_config)})
  if unexpected:
    raise ModelFileError.at(f"tensors with no place in the model: {unexpected[:8]}"
                            f"{' ...' if len(unexpected) > 8 else ''}", directory,
                            "the weights hold a feature this model does not compute, or belong to another config.json")
  params = _load_mapped(mappings, files, abstract, shardings)

  if has_value_head(directory):
    value_file = os.path.join(directory, hf_layout.VALUE_HEAD_FILE)
    value_maps = hf_layout.value_head_mappings(model_config)
    names = _names(value_file)
    expected = {m.hf_name for m in value_maps}
    if names != expected:
      raise ModelFileError.at(f"holds {sorted(names)}, expected exactly {sorted(expected)}", value_file,
                              "give the value head exported with this model, or remove it for a fresh head")
    params.update(_load_mapped(value_maps, {n: value_file for n in names}, abstract, shardings))
  else:
    params["value_head"] = placement.fresh_value_head(model_config, shardings, seed)
  if model_config.candidate_head != "none":
    params["candidate_head"] = load_candidate_head(directory, model_config, abstract, shardings, seed)
  return params


def load_model_config(directory: str, **run_fields) -> ModelConfig:
  """ModelConfig of an HF dir (or a `.gguf` file); `run_fields` sets dtype / remat / dropout."""
  if gguf_file.is_gguf_path(directory):
    return gguf_import.load_model_config(directory, **run_fields)
  run_fields.setdefault("candidate_head", candidate_head_kind(directory))  # An exported LenVM's own head.
  return hf_config.model_config_from_hf(hf_config.read_hf_config(directory),
                                        os.path.join(directory, "config.json"), **run_fields)


def check_run_matches(model_config: ModelConfig, directory: str):
  """model.init_from: every architecture field of the run must equal the checkpoint's; lists all that differ.
  `directory` may also be a llama.cpp .gguf file (its metadata then gives the architecture)."""
  if gguf_file.is_gguf_path(directory):
    path, hf_model = directory, gguf_import.load_model_config(directory)
  else:
    path = os.path.join(directory, "config.json")
    hf_model = hf_config.model_config_from_hf(hf_config.read_hf_config(directory), path)
  differ = [f"config.model.{f}={getattr(model_config, f)!r} but {path} gives {getattr(hf_model, f)!r}"
            for f in hf_config.ARCHITECTURE_FIELDS if getattr(model_config, f) != getattr(hf_model, f)]
  if differ:
    raise ValueError("the run's model does not match the checkpoint:\n  " + "\n  ".join(differ) +
                     "\nSet these fields to the checkpoint's values (or start from the matching preset).")
