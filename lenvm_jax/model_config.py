"""Model shape and numerics, and the named size presets.

The `model` section of a run config (lenvm_jax/config.py RunConfig.model); a preset is just a starting set of values
that a config file copies in (`base.get_config(preset)`, via `preset_fields(name)`).
"""

import dataclasses

DTYPES = ("float32", "bfloat16", "auto")
REMAT_POLICIES = ("none", "full", "dots", "offload")
# Self-attention kernels (model/attention.py): auto = splash on TPU, pallas_gpu on GPU, xla on CPU.
ATTENTION_IMPLS = ("auto", "xla", "splash", "pallas_gpu")
# The candidate-value head Q(s_t, x) ~ V(s_t + x) (model/candidate_head.py): none, its own per-token table, or the
# input embedding as the per-token vectors.
CANDIDATE_HEADS = ("none", "table", "tied")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 / Qwen2.5 layout.
  qk_norm: bool = False  # Qwen3 layout: RMSNorm over head_dim on q and k before RoPE.
  # Compute dtype; parameters, value head and loss stay float32. "auto": float32 on CPU (bf16 matmuls are slower
  # there), bfloat16 on accelerators.
  dtype: str = "auto"
  # Recompute each decoder layer in the backward pass: none | full | dots (keep matmul outputs) | offload (as full,
  # with each layer's input kept in host memory; transformer.remat_policy).
  remat: str = "none"
  # Self-attention kernel (model/attention.py): auto | xla | splash | pallas_gpu. A Pallas kernel on a platform it
  # was not written for runs in interpret mode (slow; for tests). Splash's query / key block sizes (tokens):
  attention: str = "auto"
  attention_block_q: int = 512
  attention_block_kv: int = 512
  # Residual dropout on every attention and MLP output, in training only (evaluation, prediction and decoding never
  # drop): against a small trunk memorising the few hundred prompts of a real-data job.
  dropout_rate: float = 0.0
  # A candidate-value head beside the value head (trained when loss.candidate_weight > 0): the values of every next
  # token from the current hidden state alone, so guided decoding scores k candidates without a k-token forward.
  candidate_head: str = "none"  # none | table | tied
  # Weights that start a fresh run: a Hugging Face causal-LM dir (Llama / Qwen2 / Qwen3, + its value head if it has
  # value_head.safetensors). Its architecture must match the fields above; a resumed run ignores it. Not a shape:
  # the model never reads it, and two configs that differ only here build the same model.
  init_from: str = dataclasses.field(default="", compare=False)

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
    for name in ("attention_block_q", "attention_block_kv"):
      if getattr(self, name) <= 0 or getattr(self, name) % 128:
        raise ValueError(f"model.{name} must be a positive multiple of 128 (TPU lanes), got {getattr(self, name)}")
    if self.candidate_head not in CANDIDATE_HEADS:
      raise ValueError(f"model.candidate_head must be one of {CANDIDATE_HEADS}, got {self.candidate_head!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate must lie in [0, 1), got {self.dropout_rate}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")

  @property
  def compute_dtype(self):
    # Imported here: config objects are built without the accelerator stack.
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from lenvm_jax import sharding  # pylint: disable=g-import-not-at-top
    if self.dtype == "auto":  # By the platform compiled for (a TPU topology's on a CPU host too).
      return jnp.float32 if sharding.target_platform() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[self.dtype]


# Shapes of the public checkpoints the paper starts from (their config.json), so that HF import lands on the same
# parameter tree. vocab_size is the embedding rows (padded), not the tokenizer size.
PRESETS = {
    # Seconds-scale tests.
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64),
    # The CPU demo: a few minutes of training on 2 cores (~18k tokens/s there in float32).
    "small": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, mlp_dim=4864, rope_theta=1e6, tie_embeddings=True, qkv_bias=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, mlp_dim=8960, rope_theta=1e6, tie_embeddings=True, qkv_bias=True),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, mlp_dim=6144, rope_theta=1e6, tie_embeddings=True, qk_norm=True),
    # The paper's larger LenVMs (experiments/configs/paper_shapes.py compiles them for TPU slices).
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       head_dim=128, mlp_dim=18944, rope_theta=1e6, qkv_bias=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                     head_dim=128, mlp_dim=12288, rope_theta=1e6, qk_norm=True),
    "qwen3-32b": dict(vocab_size=151936, hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                      head_dim=128, mlp_dim=25600, rope_theta=1e6, qk_norm=True),
}


def preset_fields(name: str) -> dict:
  """All ModelConfig fields for a preset (defaults filled in), ready to put into a run config."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.default is not dataclasses.MISSING}
  return {"vocab_size": 0, **defaults, **PRESETS[name]}
