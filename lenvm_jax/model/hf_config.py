"""Hugging Face `config.json` <-> ModelConfig for the Llama, Qwen2 and Qwen3 causal-LM layouts.

Only what our trunk computes is accepted: any HF feature it would silently ignore (RoPE scaling, sliding-window
attention in use, output-projection or MLP biases, another activation) is an error naming the file and the field.
"""

import json
import os

from lenvm_jax.model_config import ModelConfig

# architectures[0] -> (model_type, q/k/v bias, q/k RMSNorm). Qwen2 always has q/k/v biases; Qwen3 always q/k norms.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
# The ModelConfig fields that an HF checkpoint fixes (its architecture); dtype, remat, gamma, dropout are run choices.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                       "rope_theta", "rms_norm_eps", "tie_embeddings", "qkv_bias", "qk_norm")


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
  with open(path, encoding="utf-8") as f:
    try:
      hf = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: must hold a JSON object, got {type(hf).__name__}")
  return hf


def _rope_theta(hf: dict, path: str) -> float:
  """RoPE base; both the transformers 5 `rope_parameters` and the older top-level `rope_theta` / `rope_scaling`."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for field, section in (("rope_parameters", params), ("rope_scaling", scaling)):
    rope_type = section.get("rope_type", section.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"{path}: {field} has rope_type {rope_type!r}; only plain RoPE ('default') is supported")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict, path: str = "config.json", **run_fields) -> ModelConfig:
  """ModelConfig of an HF config dict; `run_fields` sets the non-architecture fields (dtype, remat, gamma)."""
  architectures = hf.get("architectures") or []
  if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
    raise ValueError(f"{path}: architectures is {architectures}; supported: one of {sorted(ARCHITECTURES)}")
  model_type, qkv_bias, qk_norm = ARCHITECTURES[architectures[0]]
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{path}: hidden_act is {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
  for field in ("mlp_bias",) + (("attention_bias",) if model_type != "qwen2" else ()):
    if hf.get(field):
      raise ValueError(f"{path}: {field}=true is not supported by the {architectures[0]} import")
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
    raise ValueError(f"{path}: sliding-window attention is in use (use_sliding_window / layer_types); "
                     "only full causal attention is supported")
  missing = [f for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size") if f not in hf]
  if missing:
    raise ValueError(f"{path}: missing fields {missing}")
  num_heads = hf["num_attention_heads"]
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads, mlp_dim=hf["intermediate_size"],
        rope_theta=_rope_theta(hf, path), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, qk_norm=qk_norm,
        **run_fields)
  except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type (a string for a number).
    raise ValueError(f"{path}: {e}") from None


def hf_config_from_model_config(model_config: ModelConfig, **extra) -> dict:
  """The config.json of our model in the matching HF layout (Qwen3 for q/k norm, Qwen2 for q/k/v bias, else
  Llama); `extra` adds fields such as bos/eos token ids."""
  c = model_config
  if c.qkv_bias and c.qk_norm:
    raise ValueError("model has both qkv_bias and qk_norm: no Hugging Face architecture has that layout")
  architecture = "Qwen3ForCausalLM" if c.qk_norm else "Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM"
  hf = {
      "architectures": [architecture], "model_type": ARCHITECTURES[architecture][0], "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.mlp_dim,
      "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_embeddings,
      "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
      "torch_dtype": "float32", "dtype": "float32",
  }
  if architecture == "LlamaForCausalLM":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * c.num_layers)
    if architecture == "Qwen3ForCausalLM":
      hf.update(attention_bias=False)
  hf.update(extra)
  return hf
