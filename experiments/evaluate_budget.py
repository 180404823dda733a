"""Length-guided decoding on problems with checkable answers under a hard token budget (the paper's Fig. 2).

  python -m experiments.evaluate_budget --workdir runs/smollm2_gsm/pretrained_s0 --policy=$GGUF --tokenizer=$GGUF \
      --prompts=reasoning_gym:gsm_symbolic:48 --eval_fraction=0.25 --budgets=64,96 --betas=-4,-16

The generator is --policy (a .gguf, a Hugging Face directory or a run), the LenVM the run at --workdir; the problems
are the held-out ones: those of --prompts that `experiments.generate` with the same --eval_fraction put in the eval
split (the split is by prompt id). For every budget B the same problems are answered by
  * the base model cut off at B tokens: one unguided run to the largest budget, cut at each B (a row's random stream
    depends only on its row id and step, so the cut run is exactly the run with max_new_tokens = B);
  * the tilt sweep: p'(x) ~ p(x) exp(beta u(x)) for each --betas (beta < 0: shorter), hard-cut at B; with
    --value_mode=mul|linear|exp|length_mul|value_bias the reference's expectation guidance with scale = beta instead;
  * At Most B under each --at_most convention (lenvm_jax/decoding/guided.py): "default" (the model's own answer
    among the candidates expected to fit in what is left of B; EOS at its own probability), "paper" (the candidate
    the LenVM expects to end soonest, always), "reference", "reference_lifebench" or "sample_fitting", hard-cut at B.
Sampling comes from the shared flags (experiments/sampling_flags.py: --settings=paper_tradeoff is the paper's T 1,
top-k 5, min-p 0.01); the unguided base samples the whole filtered distribution (--unguided=full) or the guided
runs' candidates. An answer counts as correct when the completion ends (EOS) within the budget and the problem's
checker accepts it (lenvm_jax/data/answers.py). Every accuracy carries its 95 % Wilson interval, and every decoding
an exact paired (McNemar) test against the truncated base on the same problems. Writes
<workdir>/evaluate_budget/{report.json,budget.png} and prints a table.
"""

import dataclasses
import json
import os

from absl import flags

from experiments import cli, sampling_flags
from lenvm_jax import errors, files, sharding
from lenvm_jax.run import config_history
from lenvm_jax.data import prompts as prompts_lib
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.decoding import policy as policy_lib
from lenvm_jax.decoding.generation import GuidedSampler
from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.decoding.eos import check_in_vocabulary
from lenvm_jax.decoding.guided_models import Pair, check_same_vocabulary, TransformerGenerator, TransformerScorer
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.evaluation.budget import correct_flags, held_out, paired_test, score, wilson_interval

_RUN = cli.run_flags("The LenVM's training workdir.")
_POLICY = flags.DEFINE_string("policy", None, "The generator: a .gguf file, Hugging Face directory or run workdir.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (default: --policy), for prompts and the checker.")
_PROMPTS = flags.DEFINE_string("prompts", None, "Problems with answers, e.g. reasoning_gym:gsm_symbolic:48.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "generate's --eval_fraction: which problems are held out.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["train", "eval"], "Which split's problems to answer.")
_MAX_PROBLEMS = flags.DEFINE_integer("max_problems", 0, "Use the first N problems of the split (0 = all).")
_BUDGETS = flags.DEFINE_list("budgets", ["64", "128"], "Hard token budgets (EOS included).")
_BETAS = flags.DEFINE_list("betas", ["-4", "-16"], "Tilt strengths (beta < 0: shorter).")
_AT_MOST = flags.DEFINE_list("at_most", ["default"], "At Most B rule conventions to run: default, paper, reference, "
                             "reference_lifebench, sample_fitting.")
_BASE_TOKENS = flags.DEFINE_integer("base_tokens", 256, "The unguided run's own limit (at least the largest budget): "
                                    "its accuracy without a budget is reported as unbounded_base.")
sampling_flags.define(length_rules=False)
_BATCH = cli.batch_size_flag(16, "Rows decoded together.")
_SEED = cli.seed_flag()
flags.mark_flags_as_required(["policy", "prompts"])


def format_table(report: dict) -> str:
  settings = report["sampling"]
  lines = [f"{report['problems']} held-out problems, k = {report['candidates']}, sampling {settings['settings']}: "
           f"T {settings['temperature']:g}, top-k {settings['top_k']}, top-p {settings['top_p']:g}, min-p "
           f"{settings['min_p']:g} ({settings['filter_style']} filter), unguided base: {settings['unguided']}",
           f"{'budget':>6}  {'decoding':<22} {'accuracy':>8} {'95% interval':>13} {'correct':>7} {'ended':>6} "
           f"{'mean len':>8}  vs truncation (only this / only base, exact paired p)"]
  for budget, runs in report["budgets"].items():
    for name, r in runs.items():
      low, high = r.get("accuracy_95", (float("nan"), float("nan")))
      versus = r.get("vs_truncation")
      paired = f"  {versus['only_this']:3d} / {versus['only_other']:3d}, p = {versus['p_value']:.3f}" if versus else ""
      lines.append(f"{budget:>6}  {name:<22} {r['accuracy']:8.3f} [{low:.2f}, {high:.2f}] {r['correct']:7d} "
                   f"{r['ended']:6.2f} {r['mean_length']:8.1f}{paired}")
  return "\n".join(lines)


def plot(path: str, report: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for budget, runs in report["budgets"].items():
    base = runs["base (truncated)"]
    line, = ax.plot([base["mean_length"]], [base["accuracy"]], marker="s", ls="none",
                    label=f"B={budget}: base cut at B")
    tilt = [(name, r) for name, r in runs.items() if name != "base (truncated)" and not name.startswith("at_most")]
    ax.plot([r["mean_length"] for _, r in tilt], [r["accuracy"] for _, r in tilt], marker="o",
            color=line.get_color(), label=f"B={budget}: {tilt[0][0].rsplit(' ', 1)[0] if tilt else 'tilt'} sweep")
    for name, r in tilt:
      ax.annotate(name.split()[-1], (r["mean_length"], r["accuracy"]), fontsize=7)
    for (name, at_most), marker in zip([(n, r) for n, r in runs.items() if n.startswith("at_most")], "^v<>"):
      ax.plot([at_most["mean_length"]], [at_most["accuracy"]], marker=marker, ls="none", color=line.get_color(),
              label=f"B={budget}: {name.replace(str(budget), 'B')}")
  ax.set(xlabel="mean length (tokens, cut at the budget)", ylabel="accuracy (correct, ended within budget)",
         title="hard budget: truncation vs length-guided decoding")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _numbers(flag: str, values: list[str], kind) -> list:
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag}: expected comma-separated {kind.__name__}s, got {','.join(values)!r}") from None


def main(argv):
  del argv
  mesh = sharding.make_mesh(1, 1, 1)  # The Predictor's: its params live on one device.
  with cli.user_errors(ValueError, OSError):
    budgets = sorted(_numbers("budgets", _BUDGETS.value, int))
    betas = _numbers("betas", _BETAS.value, float)
    if _BASE_TOKENS.present and _BASE_TOKENS.value < budgets[-1]:  # The cut runs are prefixes of the base run.
      raise errors.UserError.at(f"--base_tokens={_BASE_TOKENS.value} is below the largest budget {budgets[-1]}",
                                "--base_tokens", "give at least the largest of --budgets (or leave it out)")
    # Relations between the models, before any weight loads: one vocabulary, EOS ids inside it.
    vocab_size = policy_lib.read_model_config(_POLICY.value).vocab_size
    check_same_vocabulary(vocab_size, config_history.read_config(_RUN.workdir.value).model.vocab_size,
                          f"--policy={_POLICY.value}", f"--workdir={_RUN.workdir.value}")
    candidates = sampling_flags.resolve().candidates
    if candidates > vocab_size:
      raise ValueError(f"--candidates must lie in [1, {vocab_size}] (the policy's vocabulary), got {candidates}")
    policy_eos = policy_lib.read_eos_ids(_POLICY.value)
    check_in_vocabulary(policy_eos, vocab_size, f"--policy={_POLICY.value}, its eos_token_id")
    tokenizer = load_tokenizer(_TOKENIZER.value or _POLICY.value)
    if not policy_eos:
      check_in_vocabulary((tokenizer.eos_id,), vocab_size, f"--tokenizer={_TOKENIZER.value or _POLICY.value}, its EOS")
    predictor = cli.load_predictor(_RUN)
    policy = policy_lib.load_policy(_POLICY.value, mesh)
    problems = held_out(prompts_lib.load_prompts(_PROMPTS.value, policy.model_config.vocab_size, tokenizer),
                        _SPLIT.value, _EVAL_FRACTION.value)
    if _MAX_PROBLEMS.value:
      problems = problems[:_MAX_PROBLEMS.value]
    if not problems or any(p.answer is None for p in problems):
      raise ValueError(f"--prompts={_PROMPTS.value}: needs problems with answers in the {_SPLIT.value} split")
    eos_ids = policy.eos_ids or (tokenizer.eos_id,)
  models = Pair(TransformerGenerator(policy.graphdef, policy.model_config.vocab_size),
                TransformerScorer(predictor.graphdef, predictor.kind))
  params = (policy.params, predictor.params)
  prompt_ids = [p.prompt_ids.tolist() for p in problems]

  with cli.user_errors(ValueError):
    options = sampling_flags.resolve()
    at_most_rules = [options.request("at_most", 1, convention) for convention in _AT_MOST.value]
    options.config(1, eos_ids, _SEED.value)  # A bad filter value fails here, naming its flag.
    if not 1 <= options.candidates <= policy.model_config.vocab_size:
      raise ValueError(f"--candidates must lie in [1, {policy.model_config.vocab_size}], got {options.candidates}")

  def run(max_new_tokens: int, request: LengthRequest):
    sampling = options.config(max_new_tokens, eos_ids, _SEED.value)
    if request.rule == "none" and options.unguided == "full":  # The paper's baseline: the whole distribution.
      sampler = Sampler(policy.graphdef, policy.params, sampling, mesh, batch_size=_BATCH.value)
      samples = sampler.generate(prompt_ids)
    else:
      sampler = GuidedSampler(models, params, sampling, mesh, num_candidates=options.candidates,
                              batch_size=_BATCH.value)
      if request.rule == "none":  # --unguided=candidates: the base among the k candidates.
        request = options.unguided_request()
      samples = sampler.generate(prompt_ids, [request] * len(prompt_ids))
    return samples, [tokenizer.decode(s.completion_ids.tolist()) for s in samples]

  report = {"checkpoint_step": predictor.step, "policy": policy.description, "prompts": _PROMPTS.value,
            "problems": len(problems), "candidates": options.candidates, "sampling": options.describe(),
            "budgets": {}}
  base_tokens = max(budgets[-1], _BASE_TOKENS.value)
  base, base_texts = run(base_tokens, LengthRequest())

  def scored(samples, texts, budget, truncated=None):
    """score() with the accuracy's Wilson interval and, against the truncated base, the exact paired test."""
    out = score(samples, texts, problems, budget)
    flags_ = correct_flags(samples, texts, problems, budget)
    out["accuracy_95"] = list(wilson_interval(int(flags_.sum()), len(flags_)))
    if truncated is not None:
      out["vs_truncation"] = paired_test(flags_, truncated)
    return out, flags_

  for budget in budgets:
    # The base run cut at this budget: its first `budget` tokens, finished only if EOS came within them.
    cut = [dataclasses.replace(s, completion_ids=s.completion_ids[:budget],
                               finished=s.finished and len(s.completion_ids) <= budget) for s in base]
    cut_texts = [tokenizer.decode(s.completion_ids.tolist()) for s in cut]
    base_scored, truncated = scored(cut, cut_texts, budget)
    runs = {"base (truncated)": base_scored}
    for beta in betas:
      name = f"tilt beta {beta:g}" if options.value_mode == "centered_exp" else f"{options.value_mode} {beta:g}"
      runs[name] = scored(*run(budget, options.sweep_request(beta)), budget, truncated)[0]
    for convention, rule in zip(_AT_MOST.value, at_most_rules):
      name = f"at_most {budget}" + (f" ({convention})" if len(at_most_rules) > 1 else "")
      runs[name] = scored(*run(budget, dataclasses.replace(rule, target=budget)), budget, truncated)[0]
    report["budgets"][str(budget)] = runs
    print(format_table({**report, "budgets": {str(budget): runs}}), flush=True)
  report["unbounded_base"] = {"max_new_tokens": base_tokens, **score(base, base_texts, problems, base_tokens)}
  out_dir = os.path.join(_RUN.workdir.value, "evaluate_budget")
  os.makedirs(out_dir, exist_ok=True)
  plot(os.path.join(out_dir, "budget.png"), report)
  files.write_report(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1), items=len(problems),
                     what="problems", where=f"--prompts={_PROMPTS.value}")
  print(format_table(report))
  unbounded = report["unbounded_base"]
  print(f"base model up to {base_tokens} tokens: accuracy {unbounded['accuracy']:.3f} ({unbounded['correct']} "
        f"correct), ended {unbounded['ended']:.2f}, mean length {unbounded['mean_length']:.1f}")
  print(f"report and plot in {out_dir}")


if __name__ == "__main__":
  cli.run(main)
