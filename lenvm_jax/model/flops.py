"""Model FLOPs: the analytic count that MFU is quoted against (experiments/bench.py, compile_check, device_check).

The compiler's own count of a step (train/step.py train_step_flops) is larger by what remat recomputes and by the
small ops this formula leaves out.
"""

from lenvm_jax.model_config import ModelConfig


def train_flops_per_token(c: ModelConfig, seq_len: int, lm_share: float = 0.0) -> float:
  """Training FLOPs per token: 3 x forward (forward + 2 x backward); forward = 2 x matmul params + attention scores
  and mixing (2 x 2 x T x heads x head_dim per layer, the whole T x T square). The embedding gather is free. The LM
  head (hidden x vocab) counts on lm_share of the tokens: 0 without the LM term, 1 / loss.lm_stride with it."""
  attn_proj = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.mlp_dim
  value_head = c.hidden_size * c.hidden_size + c.hidden_size
  forward = 2 * (c.num_layers * (attn_proj + mlp) + value_head + lm_share * c.hidden_size * c.vocab_size)
  forward += c.num_layers * 4 * seq_len * c.num_heads * c.head_dim
  return 3.0 * forward
