"""Sample rollouts from a policy into ArrayRecord trajectory shards that training reads (data.source=arrayrecord).

  python -m experiments.generate --policy=runs/policy --prompts=prompts.jsonl --eos_ids=1 --output_dir=data/rollouts \
      [--num_samples=4] [--max_new_tokens=256] [--temperature=1.0] [--top_k=0] [--top_p=1.0] [--min_p=0.0]
      [--filter_style=hf|reference] [--settings=paper_lifebench|paper_tradeoff]
  python -m experiments.generate --policy=HF_DIR --tokenizer=HF_DIR --prompts=champ --output_dir=data/champ_rollouts
  python -m experiments.generate --policy=M.gguf --tokenizer=M.gguf --prompts=reasoning_gym:gsm_symbolic:200 \
      --num_samples=4 --output_dir=data/gsm_rollouts

--policy: a lenvm_jax run workdir (latest checkpoint) or a Hugging Face causal-LM directory (lenvm_jax/decoding/
policy.py). --prompts: a prompt JSONL (lenvm_jax/data/prompts.py: prompt_ids, messages or prompt per line), `champ`,
`reasoning_gym:TASK[:N[:SEED[:KEY=VALUE;...]]]` (seeded problems with answers; KEY=VALUE are the task's config
fields; "+" mixes tasks), or `arrayrecord:PATH`. Prompts with answers add "answer" and "correct" (the checker on
the decoded completion) to each record's meta and the accuracy to stats.json.
EOS ids: --eos_ids, else the HF directory's, else the tokenizer's, else a run's own (its config.json's record).
Writes <output_dir>/{train,eval}-*.array_record, stats.json and generation.json; rerunning the same command skips
finished shards (lenvm_jax/decoding/rollouts.py). A directory that holds another import or rollouts with other
settings is refused (--overwrite replaces them). Bad input: one line "error: ..." and exit code 2.
"""

import os
import sys
import time

from absl import app, flags

from experiments import cli, sampling_flags
from lenvm_jax import progress, sharding
from lenvm_jax.data import prompts as prompts_lib
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.decoding import policy as policy_lib, rollouts
from lenvm_jax.decoding.eos import check_in_vocabulary
from lenvm_jax.decoding.generation import Sampler

_POLICY = flags.DEFINE_string("policy", None, "Run workdir or Hugging Face model directory to sample from.")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompt JSONL, 'champ', "
                               "'reasoning_gym:TASK[:N[:SEED[:KEY=VALUE;...]]]' ('+' mixes tasks), or "
                               "'arrayrecord:PATH'.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the shards, stats.json and generation.json go.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF tokenizer dir, tokenizer.json or SentencePiece model: for "
                                 "text prompts, decoded text in the records, and the default EOS id.")
_GENERATOR = flags.DEFINE_string("generator", None, "Generator name in the records (default: the policy path).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Completions longer than this are cut (finished=false).")
sampling_flags.define(candidates=False, length_rules=False)  # --settings, --temperature, --top_k/p, --min_p, ...
_EOS = flags.DEFINE_list("eos_ids", None, "Token ids that end a completion.")
_SEED = cli.seed_flag(0, "Sampling seed (each sample's stream also depends on its prompt and index).")
_BATCH = cli.batch_size_flag(16, "Rows per decode batch (a multiple of mesh data x fsdp).")
_SHARD = flags.DEFINE_integer("shard_size", 4096, "Trajectories per ArrayRecord shard (the unit of resume).")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "Share of prompts (without a split) that go to eval.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh sizes data,fsdp,tensor (-1: the devices left).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace another import (or rollouts with other settings) in "
                               "--output_dir instead of refusing.")
flags.mark_flags_as_required(["policy", "prompts", "output_dir"])


class ProgressLine:
  """rollouts' on_progress as the console's progress line (lenvm_jax/progress.py): samples done, tokens/s, ETA; in a
  log (no terminal) one line every 30 s."""

  def __init__(self):
    self.start, self.line = time.monotonic(), None

  def __call__(self, done: int, total: int, tokens: int):
    if self.line is None:
      self.line = progress.ProgressLine("generate", total, started_at=self.start, line_every_s=30)
    self.line.update(done, **{"tokens/s": tokens / max(time.monotonic() - self.start, 1e-9)})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors(ValueError, OSError):  # A mesh, sampling setting or policy path that cannot work.
    mesh = sharding.make_mesh(*(int(size) for size in _MESH.value))
    explicit_eos = cli.int_list("eos_ids", _EOS.value)
    vocab_size = policy_lib.read_model_config(_POLICY.value).vocab_size  # Before any weight loads.
    check_in_vocabulary(explicit_eos, vocab_size, f"--eos_ids={','.join(_EOS.value or ())}")
    policy_eos = () if explicit_eos else policy_lib.read_eos_ids(_POLICY.value)
    check_in_vocabulary(policy_eos, vocab_size, f"--policy={_POLICY.value}, its eos_token_id")
    tokenizer = load_tokenizer(_TOKENIZER.value) if _TOKENIZER.value else None
    # A run as the policy: after the caller's tokenizer, the ids its config.json records (run/eos.py).
    recorded = () if explicit_eos or policy_eos or tokenizer else policy_lib.run_eos_ids(_POLICY.value)
    eos_ids = explicit_eos or policy_eos or ((tokenizer.eos_id,) if tokenizer else ()) or recorded
    if not eos_ids:
      raise ValueError(f"--eos_ids is needed: {_POLICY.value} names no EOS id and no --tokenizer was given")
    check_in_vocabulary(eos_ids, vocab_size, f"--policy={_POLICY.value}, its recorded EOS ids" if recorded else
                        f"--tokenizer={_TOKENIZER.value}, its EOS")
    policy = policy_lib.load_policy(_POLICY.value, mesh)
    sampling = sampling_flags.resolve().config(_MAX_NEW.value, eos_ids, _SEED.value)
    prompts = prompts_lib.load_prompts(_PROMPTS.value, policy.model_config.vocab_size, tokenizer,
                                       _EVAL_FRACTION.value)
    sampler = Sampler(policy.graphdef, policy.params, sampling, mesh, batch_size=_BATCH.value)
    generator = _GENERATOR.value or os.path.basename(os.path.normpath(_POLICY.value))
    settings = {"policy": policy.description, "prompts": _PROMPTS.value, "sampling": sampling.to_dict()}
    print(f"{len(prompts)} prompts x {_NUM_SAMPLES.value} samples from {policy.description}", file=sys.stderr)
    result = rollouts.generate_rollouts(
        sampler, prompts, _OUTPUT.value, num_samples=_NUM_SAMPLES.value, generator=generator, settings=settings,
        shard_size=_SHARD.value, eval_fraction=_EVAL_FRACTION.value, tokenizer=tokenizer, on_progress=ProgressLine(),
        overwrite=_OVERWRITE.value)
  records, shards = result["records"], result["shards"]
  print(", ".join(f"{split}: {records[split]} records in {shards[split]} shards" for split in records))
  for split, split_stats in result["splits"].items():
    overall = split_stats["overall"]
    print(f"{split}: completion length p50 {overall.get('p50', 0):.0f}, p99 {overall.get('p99', 0):.0f}, "
          f"unfinished {overall['unfinished_fraction']:.1%}")
    # Nothing is dropped here; a cut completion is kept unfinished (training's data.unfinished decides its fate).
    print(f"{split}: {overall['unfinished']} of {overall['records']} completions cut at --max_new_tokens="
          f"{_MAX_NEW.value} ({overall['unfinished'] * _MAX_NEW.value} tokens in them, kept with finished=false); "
          "0 prompts cut (prompts are sampled whole)")
  for split, scored in result.get("answers", {}).items():
    print(f"{split}: {scored['correct']}/{scored['scored']} completions correct ({scored['accuracy']:.1%})")
  print(f"wrote {os.path.join(_OUTPUT.value, 'stats.json')}")


if __name__ == "__main__":
  cli.run(main)
