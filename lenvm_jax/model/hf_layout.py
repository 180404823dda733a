"""Which Hugging Face tensor is which of our parameters, and how its layout differs.

PyTorch Linear weights are [out, in]; ours are [in, out] with the head dims split out: q/k/v are
[hidden, heads, head_dim] and o is [heads, head_dim, hidden], where the HF row (or column) index is
head * head_dim + d (head-major), so a transpose followed by a reshape converts exactly. Biases and norm scales only
reshape. The value head follows the LenVM reference (spec section 6): `value_head.safetensors` with `v_head.*`.
"""

import dataclasses

import numpy as np

from lenvm_jax.model.config import ModelConfig

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  path: tuple  # Key path in our params pure dict, e.g. ("layers", 0, "attention", "q").
  hf_name: str  # Tensor name in the HF safetensors files.
  hf_shape: tuple
  transpose: bool  # A Linear weight: HF [out, in] vs our [in, ...out dims...].

  def to_ours(self, tensor: np.ndarray, shape) -> np.ndarray:
    return (tensor.T if self.transpose else tensor).reshape(shape)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    if self.transpose:
      return np.ascontiguousarray(param.reshape(self.hf_shape[::-1]).T)
    return param.reshape(self.hf_shape)


def trunk_mappings(config: ModelConfig) -> list[TensorMapping]:
  """Embedding, decoder layers, final norm and (untied) LM head, in HF file order."""
  c = config
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  maps = [TensorMapping(("embedding",), "model.embed_tokens.weight", (c.vocab_size, c.hidden_size), False)]
  for i in range(c.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    attn = ours + ("attention",)
    maps += [
        TensorMapping(ours + ("input_norm", "scale"), hf + "input_layernorm.weight", (c.hidden_size,), False),
        TensorMapping(attn + ("q",), hf + "self_attn.q_proj.weight", (q_out, c.hidden_size), True),
        TensorMapping(attn + ("k",), hf + "self_attn.k_proj.weight", (kv_out, c.hidden_size), True),
        TensorMapping(attn + ("v",), hf + "self_attn.v_proj.weight", (kv_out, c.hidden_size), True),
        TensorMapping(attn + ("o",), hf + "self_attn.o_proj.weight", (c.hidden_size, q_out), True),
    ]
    if c.qkv_bias:
      maps += [TensorMapping(attn + (f"{n}_bias",), hf + f"self_attn.{n}_proj.bias", (size,), False)
               for n, size in (("q", q_out), ("k", kv_out), ("v", kv_out))]
    if c.qk_norm:
      maps += [TensorMapping(attn + (f"{n}_norm", "scale"), hf + f"self_attn.{n}_norm.weight", (c.head_dim,), False)
               for n in ("q", "k")]
    maps += [
        TensorMapping(ours + ("post_attention_norm", "scale"), hf + "post_attention_layernorm.weight",
                      (c.hidden_size,), False),
        TensorMapping(ours + ("mlp", "gate"), hf + "mlp.gate_proj.weight", (c.mlp_dim, c.hidden_size), True),
        TensorMapping(ours + ("mlp", "up"), hf + "mlp.up_proj.weight", (c.mlp_dim, c.hidden_size), True),
        TensorMapping(ours + ("mlp", "down"), hf + "mlp.down_proj.weight", (c.hidden_size, c.mlp_dim), True),
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


def get_path(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
