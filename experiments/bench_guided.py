"""Cost of length-guided decoding: time per generated token of plain sampling vs guided sampling, same model, batch.

  python -m experiments.bench_guided [--preset=small --batch=16 --prompt_len=32 --new_tokens=256 --candidates=5,15]

Weights are random (cost does not depend on them). Plain sampling is lenvm_jax/decoding/sampler.py; guided sampling
is lenvm_jax/decoding/guided.py with the Equal-To rule, both as one shared-trunk model (generator = LenVM) and as two
models (a generator and a separate LenVM of the same shape, each with its own KV cache). A row may stop early, but
every decode step runs the whole batch, so the cost is time / (decode steps x batch): one token per row per step.

--scorer (default both): next_state runs the k candidates through the LenVM as k extra tokens over its KV cache;
candidate_head reads their values off the hidden state the step already computed (decoding/candidate_scoring.py),
so only the chosen token runs. The models then carry a candidate head (--candidate_head: table or tied); plain
sampling and the next-state scorer ignore it. Variants are timed round-robin (repeat r of every variant, then repeat
r + 1), so a busy machine slows them alike and the ratios stay comparable; the best run of each is kept.
"""

import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from experiments import cli, sampling_flags
from lenvm_jax import sharding
from lenvm_jax.decoding import candidate_scoring
from lenvm_jax.decoding.generation import GuidedSampler
from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.data.synthetic import EOS_ID  # A random model speaks the synthetic ids: 0 pad, 1 EOS, prompts >= 2.
from lenvm_jax.errors import UserError
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import LengthValueModel
from lenvm_jax.value.targets import TargetKind

_PRESET = cli.preset_flag(help_text="Model shape (lenvm_jax/model_config.py PRESETS).")
_LENVM_PRESET = flags.DEFINE_string("lenvm_preset", "", "Shape of the separate LenVM in the two-model layout "
                                    "(same vocabulary); empty = the generator's.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary rows; 0 = the preset's (64 for the CPU presets).")
_BATCH = flags.DEFINE_integer("batch", 16, "Rows decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "Decode steps (max_new_tokens).")
_CANDIDATES = flags.DEFINE_list("candidates", ["5", "15"], "Candidate counts k to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after one warm-up (compile) run; the best is kept.")
_SCORERS = flags.DEFINE_list("scorer", list(candidate_scoring.SCORERS),
                             f"Candidate scorers to time: {', '.join(candidate_scoring.SCORERS)}.")
sampling_flags.define(candidates=False, length_rules=False)  # The filters; --candidates is a list here.
_CANDIDATE_HEAD = flags.DEFINE_enum("candidate_head", "table", ["table", "tied"],
                                    "Layout of the candidate head when --scorer includes candidate_head.")


def _times_per_token(variants: dict, prompts) -> dict:
  """Best time per token of each variant ({name: generate(prompts)}), timed round-robin after one compile run each."""
  for generate in variants.values():
    generate(prompts)  # Compile.
  best = dict.fromkeys(variants, np.inf)
  for _ in range(_REPEATS.value):
    for name, generate in variants.items():
      start = time.perf_counter()
      steps = max(len(s.completion_ids) for s in generate(prompts))
      best[name] = min(best[name], (time.perf_counter() - start) / (steps * len(prompts)))
  return best


def _random_model(config: ModelConfig, seed: int):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LengthValueModel(config, nnx.Rngs(seed))))
  init = jax.jit(lambda: nnx.split(LengthValueModel(config, nnx.Rngs(seed)))[1].to_pure_dict())
  return graphdef, init()


def main(argv):
  del argv
  # A never-emitted EOS id would need a vocabulary change; instead count decode steps (see the module docstring).
  sampling = sampling_flags.resolve().config(_NEW_TOKENS.value, (EOS_ID,), 0)  # Bad filter values fail first.
  vocab_size = _VOCAB.value or preset_fields(_PRESET.value).get("vocab_size") or 64
  unknown = sorted(set(_SCORERS.value) - set(candidate_scoring.SCORERS))
  if unknown:
    raise ValueError(f"--scorer: unknown {unknown}; choose from {', '.join(candidate_scoring.SCORERS)}")
  # Relations, before any model is built: prompts draw ids >= 2 (1 is the EOS), k candidates need k tokens.
  if vocab_size < 3:
    raise UserError(f"--vocab_size={vocab_size}: must be at least 3 (ids 0, 1 are pad and EOS; prompts use the rest)")
  too_many = [k for k in cli.int_list("candidates", _CANDIDATES.value) if k > vocab_size]
  if too_many:
    raise UserError(f"--candidates={','.join(_CANDIDATES.value)}: {too_many[0]} candidates exceed the vocabulary of "
                    f"{vocab_size} tokens (--vocab_size / --preset)")
  head = _CANDIDATE_HEAD.value if "candidate_head" in _SCORERS.value else "none"
  config = ModelConfig(**{**preset_fields(_PRESET.value), "vocab_size": vocab_size, "candidate_head": head})
  lenvm_config = ModelConfig(**{**preset_fields(_LENVM_PRESET.value or _PRESET.value), "vocab_size": vocab_size,
                                "candidate_head": head})
  graphdef, generator_params = _random_model(config, 0)
  lenvm_graphdef, lenvm_params = _random_model(lenvm_config, 1)
  mesh = sharding.make_mesh(-1, 1, 1)
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, config.vocab_size, size=(_BATCH.value, _PROMPT_LEN.value)).tolist()
  kind = TargetKind("discounted", 0.997, 1024.0)
  requests = [LengthRequest("equal_to", _NEW_TOKENS.value)] * len(prompts)

  plain = Sampler(graphdef, generator_params, sampling, mesh, batch_size=_BATCH.value)
  variants = {"plain": plain.generate}
  for k in map(int, _CANDIDATES.value):
    for scorer in _SCORERS.value:
      layouts = {"shared trunk": (candidate_scoring.shared_trunk(scorer, graphdef, kind, config), generator_params),
                 "two models": (candidate_scoring.pair(scorer, graphdef, lenvm_graphdef, kind, lenvm_config),
                                (generator_params, lenvm_params))}
      for name, (models, params) in layouts.items():
        guided = GuidedSampler(models, params, sampling, mesh, num_candidates=k, batch_size=_BATCH.value)
        variants[(k, name, scorer)] = lambda p, g=guided: g.generate(p, requests)
  costs = _times_per_token(variants, prompts)
  base = costs.pop("plain")
  print(f"generator {_PRESET.value} ({config.num_layers} layers x {config.hidden_size}, vocab {config.vocab_size}), "
        f"two-model LenVM {lenvm_config.num_layers} x {lenvm_config.hidden_size}; batch {_BATCH.value}, prompt "
        f"{_PROMPT_LEN.value}, {_NEW_TOKENS.value} new tokens, {jax.device_count()} x {jax.devices()[0].platform}")
  print(f"plain sampling: {base * 1e6:9.1f} us/token" + (f"  (model with a {head} candidate head)" if head != "none"
                                                          else ""))
  for (k, name, scorer), cost in costs.items():
    print(f"guided k={k:<3} {name:<13} {scorer:<14}: {cost * 1e6:9.1f} us/token  ratio {cost / base:5.2f}x")


if __name__ == "__main__":
  cli.run(main)
