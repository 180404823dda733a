"""Which Hugging Face tensor is which of our parameters, and how its layout differs.

PyTorch Linear weights are [out, in]; ours are [in, out] with the head dims split out: q/k/v are
[hidden, heads, head_dim] and o is [heads, head_dim, hidden], where the HF row (or column) index is
head * head_dim + d (head-major), so a transpose followed by a reshape converts exactly. Biases and norm scales only
reshape. The value head follows the LenVM reference (docs/method.md §12): `value_head.safetensors` with `v_head.*`.
Our decoder layers are stacked (model/transformer.py): HF's `model.layers.{i}.*` is slice i of our `layers` arrays.
"""

import dataclasses
import functools

import numpy as np

from lenvm_jax.model_config import ModelConfig

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  path: tuple  # Key path in our params pure dict, e.g. ("layers", "attention", "q").
  hf_name: str  # Tensor name in the HF safetensors files.
  hf_shape: tuple
  transpose: bool  # A Linear weight: HF [out, in] vs our [in, ...out dims...].
  layer: int | None = None  # Decoder layer i: the tensor is slice i of our stacked array at `path`.

  def to_ours(self, tensor: np.ndarray, shape) -> np.ndarray:
    return (tensor.T if self.transpose else tensor).reshape(shape)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    if self.transpose:
      return np.ascontiguousarray(param.reshape(self.hf_shape[::-1]).T)
    return param.reshape(self.hf_shape)


def _layer_mapping(index: int, ours: tuple, name: str, hf_shape: tuple, transpose: bool) -> TensorMapping:
  """model.layers.{index}.{name} <-> slice `index` of our stacked layers array at ("layers",) + ours."""
  return TensorMapping(("layers",) + ours, f"model.layers.{index}.{name}", hf_shape, transpose, layer=index)


def trunk_mappings(config: ModelConfig) -> list[TensorMapping]:
  """Embedding, decoder layers, final norm and (untied) LM head, in HF file order."""
  c = config
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  maps = [TensorMapping(("embedding",), "model.embed_tokens.weight", (c.vocab_size, c.hidden_size), False)]
  for i in range(c.num_layers):
    layer = functools.partial(_layer_mapping, i)
    maps += [
        layer(("input_norm", "scale"), "input_layernorm.weight", (c.hidden_size,), False),
        layer(("attention", "q"), "self_attn.q_proj.weight", (q_out, c.hidden_size), True),
        layer(("attention", "k"), "self_attn.k_proj.weight", (kv_out, c.hidden_size), True),
        layer(("attention", "v"), "self_attn.v_proj.weight", (kv_out, c.hidden_size), True),
        layer(("attention", "o"), "self_attn.o_proj.weight", (c.hidden_size, q_out), True),
    ]
    if c.qkv_bias:
      maps += [layer(("attention", f"{n}_bias"), f"self_attn.{n}_proj.bias", (size,), False)
               for n, size in (("q", q_out), ("k", kv_out), ("v", kv_out))]
    if c.qk_norm:
      maps += [layer(("attention", f"{n}_norm", "scale"), f"self_attn.{n}_norm.weight", (c.head_dim,), False)
               for n in ("q", "k")]
    maps += [
        layer(("post_attention_norm", "scale"), "post_attention_layernorm.weight", (c.hidden_size,), False),
        layer(("mlp", "gate"), "mlp.gate_proj.weight", (c.mlp_dim, c.hidden_size), True),
        layer(("mlp", "up"), "mlp.up_proj.weight", (c.mlp_dim, c.hidden_size), True),
        layer(("mlp", "down"), "mlp.down_proj.weight", (c.hidden_size, c.mlp_dim), True),
    ]
  maps.append(TensorMapping(("final_norm", "scale"), "model.norm.weight", (c.hidden_size,), False))
  if not c.tie_embeddings:
    maps.append(TensorMapping(("lm_head",), "lm_head.weight", (c.vocab_size, c.hidden_size), True))
  return maps


def value_head_mappings(config: ModelConfig) -> list[TensorMapping]:
  """The reference value head: Linear(H, H) -> SiLU -> Linear(H, 1), PyTorch layout."""
  h = config.hidden_size
  return [
      TensorMapping(("value_head", "fc"), "v_head.fc.weight", (h, h), True),
      TensorMapping(("value_head", "fc_bias"), "v_head.fc.bias", (h,), False),
      TensorMapping(("value_head", "summary"), "v_head.summary.weight", (1, h), True),
      TensorMapping(("value_head", "summary_bias"), "v_head.summary.bias", (1,), False),
  ]


# The candidate-value head (model/candidate_head.py) has no reference layout: its own file beside value_head.safetensors,
# PyTorch Linear layout ([out, in]); the file's metadata names its kind ("table" or "tied").
CANDIDATE_HEAD_FILE = "candidate_head.safetensors"


def candidate_head_mappings(config: ModelConfig) -> list[TensorMapping]:
  """c_head.fc / c_head.out: Linear(H, H) each (g = out(SiLU(fc(h)))); c_head.bias [vocab]; c_head.table [vocab, H]
  (an embedding, not a Linear) when the head has its own token vectors."""
  h, v = config.hidden_size, config.vocab_size
  maps = [
      TensorMapping(("candidate_head", "fc"), "c_head.fc.weight", (h, h), True),
      TensorMapping(("candidate_head", "fc_bias"), "c_head.fc.bias", (h,), False),
      TensorMapping(("candidate_head", "out"), "c_head.out.weight", (h, h), True),
      TensorMapping(("candidate_head", "out_bias"), "c_head.out.bias", (h,), False),
      TensorMapping(("candidate_head", "bias"), "c_head.bias", (v,), False),
  ]
  if config.candidate_head == "table":
    maps.append(TensorMapping(("candidate_head", "table"), "c_head.table.weight", (v, h), False))
  return maps


def get_param(params: dict, mapping: TensorMapping):
  """Our array for one HF tensor: the param at `mapping.path`, or its layer's slice of a stacked one."""
  param = get_path(params, mapping.path)
  return param if mapping.layer is None else param[mapping.layer]


def param_shape(abstract: dict, mapping: TensorMapping) -> tuple:
  """The shape of our array for one HF tensor (a stacked param's shape without its layers axis)."""
  shape = tuple(get_path(abstract, mapping.path).shape)
  return shape if mapping.layer is None else shape[1:]


def get_path(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
