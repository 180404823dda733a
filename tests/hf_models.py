"""Tiny random `transformers` causal LMs saved to disk, the reference side of the HF parity tests.

Needs torch and transformers (requirements-parity.txt); callers `pytest.importorskip` them first.
"""

import pathlib

# Small enough for seconds-scale tests, big enough to exercise GQA (4 query heads over 2 kv heads).
TINY_SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=256)
KINDS = ("llama", "qwen2", "qwen3")


def save_tiny_hf_model(kind: str, directory, *, tie_embeddings: bool = False, max_shard_size: str | None = None,
                       seed: int = 0, rope_theta: float = 10000.0) -> pathlib.Path:
  """Builds a random float32 `kind` model (llama | qwen2 | qwen3) of TINY_SHAPE and saves it under `directory`.

  qwen2 has q/k/v biases and qwen3 q/k RMSNorm, as in the real checkpoints; biases and norm scales are randomised
  (the library initialises them to 0 / 1, which would hide a missed or transposed tensor). `max_shard_size`
  (e.g. "20KB") saves sharded files plus model.safetensors.index.json. Returns the directory.
  """
  import torch
  import transformers

  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[kind]
  model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[kind]
  config = config_class(**TINY_SHAPE, tie_word_embeddings=tie_embeddings, rope_theta=rope_theta,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(seed)
  model = model_class(config).to(torch.float32).eval()
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        tensor.copy_(torch.randn_like(tensor) * 0.1 + (1.0 if "norm" in name else 0.0))
  directory = pathlib.Path(directory)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kwargs)
  return directory


def load_hf_model(directory):
  """The saved model back in float32 eval mode with eager attention (the reference forward)."""
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                            attn_implementation="eager")
  return model.eval()
