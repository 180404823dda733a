"""What a trained LenVM does at inference (docs/method.md §9-§11): a JSON report and PNG plots.

  python -m experiments.evaluate --config experiments/configs/synthetic.py --workdir runs/synthetic

Writes <workdir>/evaluate/report.json and plots there:
  * length-instruction following: Equal To / At Most / At Least for each target, guided vs unguided sampling of the
    same prompts, scored with LIFEBench (lenvm_jax/evaluation/length_scores.py); score_table.png;
  * quality vs length: a tilt sweep (beta <= 0) under a hard token budget; tradeoff.png;
  * length tokens: top lengthening / shortening tokens by TD residual over sampled trajectories;
  * predicted vs true remaining length along sampled trajectories; remaining_length.png.

The generator: for a run on the synthetic source it is the synthetic policy itself (the LenVM steers the policy
that produced its training data; --filler_tokens narrows its filler ids so EOS and the switch tokens fall inside
the top-k candidates; values are unaffected, fillers never change the mode). Otherwise (or --generator=shared) the
run's own LM head generates on the shared trunk; that needs a run trained with loss.lm_weight > 0.

Quality on the synthetic task: the policy's tokens carry no answer to check, so an answer is correct when it is
complete: it emits EOS within the hard budget (a truncated answer fails, as in the paper's figure 2). The
trade-off is then how much length a tilt must give up to bring the completion rate up under the budget.
--config is the run's config (its data section supplies the prompts); default: <workdir>/config.json.
"""

import json
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli, sampling_flags
from lenvm_jax import errors, files, progress, sharding
from lenvm_jax.run import config_history
from lenvm_jax.config import RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.evaluation import length_scores, length_tokens
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.decoding.eos import check_in_vocabulary, generator_eos_ids
from lenvm_jax.decoding.generation import GuidedSampler
from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.decoding import candidate_scoring
from lenvm_jax.decoding.guided_models import Pair, check_same_vocabulary
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.synthetic_models import SyntheticGenerator, SyntheticScorer
from lenvm_jax.value.targets import remaining_from_value

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file (default: <workdir>/config.json).")
_RUN = cli.run_flags()
_GENERATOR = flags.DEFINE_enum("generator", "auto", ["auto", "synthetic", "shared"],
                               "auto: the synthetic policy for a synthetic run, else the run's own LM head.")
_TARGETS = flags.DEFINE_list("targets", ["16", "32", "64", "128"], "Length targets in tokens (EOS included).")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Eval-split prompts per setting.")
_FILLER_TOKENS = flags.DEFINE_integer("filler_tokens", 4, "Synthetic generator: filler ids in use (0 = all).")
_BUDGET = flags.DEFINE_integer("budget", 64, "Hard token budget of the quality-vs-length sweep.")
_BETAS = flags.DEFINE_list("betas", ["0", "-1", "-2", "-4", "-8", "-16"], "Tilt strengths of the sweep.")
_TRAJECTORIES = flags.DEFINE_integer("trajectories", 256, "Eval trajectories for length tokens and plots.")
_THRESHOLD = flags.DEFINE_float(
    "length_token_threshold", 0.0, "|TD residual| that marks a length token; 0 = max(0.01, 2 (1 - gamma)): a "
    "token that only survives one step moves the residual by up to (1 - gamma), which passes 0.01 once gamma < 0.99.")
_BATCH = cli.batch_size_flag(64, "Rows decoded together.")
_SEED = cli.seed_flag()
_EOS = flags.DEFINE_list("eos_ids", None, "Token ids that end a completion; default: the synthetic policy's, else "
                         "--tokenizer's, else the last tokens of the run's finished eval completions.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (HF dir, tokenizer.json, SentencePiece) whose EOS id "
                                 "ends completions of the shared generator.")
sampling_flags.define()
_SCORER = flags.DEFINE_enum("scorer", "next_state", list(candidate_scoring.SCORERS),
                             "How the LenVM values the candidates: next_state (run through its trunk) or "
                             "candidate_head (read off the state's hidden vector; a run with loss.candidate_weight > 0). "
                             "Reports of other scorers than next_state go to <workdir>/evaluate_<scorer>/.")


def _models(predictor: Predictor, config: RunConfig, kind: str):
  scorer = candidate_scoring.lenvm_scorer(_SCORER.value, predictor.graphdef, predictor.kind, predictor.config.model)
  if kind == "auto":
    kind = "synthetic" if config.data.source == "synthetic" else "shared"
  if kind == "synthetic":
    if config.data.source != "synthetic":
      raise ValueError("--generator=synthetic needs a run on data.source='synthetic'")
    generator = SyntheticGenerator(pipeline.synthetic_policy(config), _FILLER_TOKENS.value)
    return "synthetic policy", Pair(generator, scorer), (None, predictor.params)
  if config.loss.lm_weight <= 0:
    raise ValueError("--generator=shared needs a run trained with loss.lm_weight > 0 (its LM head is untrained)")
  return "shared trunk", candidate_scoring.shared_trunk(_SCORER.value, predictor.graphdef, predictor.kind,
                                                        predictor.config.model), predictor.params


def eos_ids_for(models, trajectories) -> tuple[int, ...]:
  """The generator's EOS ids (decoding/eos.py): --eos_ids, else the synthetic policy's own, else --tokenizer's, else
  the run's (recorded in its config.json; a run from before the record: the last tokens of the finished completions
  among `trajectories`)."""
  synthetic = isinstance(models, Pair) and isinstance(models.generator, SyntheticGenerator)
  tokenizer_eos = load_tokenizer(_TOKENIZER.value).eos_id if _TOKENIZER.value else None
  return generator_eos_ids("synthetic" if synthetic else "shared", cli.int_list("eos_ids", _EOS.value), tokenizer_eos,
                           trajectories, workdir=_RUN.workdir.value)


def _lengths(samples):
  return np.asarray([len(s.completion_ids) for s in samples])


def _side(samples, target: int, rule: str) -> dict:
  """A LIFEBench score with what the user got beside it: mean length, shares of empty and cut answers."""
  lengths = _lengths(samples)
  return {**length_scores.summarize(lengths, [target] * len(lengths), rule),
          **length_scores.length_summary(lengths, [s.finished for s in samples])}


def length_instruction(sampler, unguided, prompts, targets, options: sampling_flags.Sampling,
                       on_step=lambda: None) -> dict:
  """Every rule at every target under the chosen rules, next to the unguided samples of the same prompts
  (on_step() after each rule's decode)."""
  report = {}
  for rule in length_scores.RULES:
    requests = [options.request(rule, t) for t in targets for _ in prompts]
    guided = sampler.generate(prompts * len(targets), requests, row_ids=list(range(len(prompts))) * len(targets))
    on_step()
    report[rule] = {str(target): {"guided": _side(guided[i * len(prompts):(i + 1) * len(prompts)], target, rule),
                                  "unguided": _side(unguided, target, rule)} for i, target in enumerate(targets)}
    report[rule]["mean_score"] = {
        side: float(np.mean([report[rule][str(t)][side]["score"] for t in targets])) for side in ("guided",
                                                                                                  "unguided")}
  return report


def quality_vs_length(sampler, prompts, betas, options: sampling_flags.Sampling, on_step=lambda: None) -> list:
  out = []
  for beta in betas:
    samples = sampler.generate(prompts, [options.sweep_request(beta)] * len(prompts))
    on_step()
    lengths = _lengths(samples)
    out.append({"beta": beta, "accuracy": float(np.mean([s.finished for s in samples])),
                "mean_length": float(lengths.mean())})
  return out


def _plots(out_dir, report, trajectories, predictions, gamma):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = {}
  fig, ax = plt.subplots(figsize=(6, 4))
  by_length = sorted(range(len(trajectories)), key=lambda i: len(trajectories[i].completion_ids))
  shown = sorted({by_length[int(q * (len(by_length) - 1))] for q in (0.5, 0.7, 0.85, 0.95, 1.0)})
  for i in shown:  # Median to longest: the short ones say little.
    t, n_hat = trajectories[i], predictions[i][1]
    steps = np.arange(len(n_hat))
    line, = ax.plot(steps, n_hat, lw=1)
    ax.plot(steps, len(t.completion_ids) - steps, ls=":", color=line.get_color(), lw=1)
    if t.exact_values is not None:
      exact = np.asarray(remaining_from_value(t.exact_values[:len(n_hat)], gamma))
      ax.plot(steps, exact, ls="--", color=line.get_color(), lw=0.8, alpha=0.6)
  ax.set(xlabel="tokens generated", ylabel="remaining tokens",
         title="predicted (solid), true (dotted), Bayes-optimal (dashed)")
  paths["remaining_length"] = os.path.join(out_dir, "remaining_length.png")
  fig.tight_layout()
  fig.savefig(paths["remaining_length"], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 4))
  sweep = report["quality_vs_length"]["sweep"]
  ax.plot([p["mean_length"] for p in sweep], [p["accuracy"] for p in sweep], marker="o")
  for p in sweep:
    ax.annotate(f"beta={p['beta']:g}", (p["mean_length"], p["accuracy"]), fontsize=7)
  ax.set(xlabel="mean length (tokens)", ylabel="accuracy (complete within budget)",
         title=f"tilt sweep, budget {report['quality_vs_length']['budget']} tokens")
  paths["tradeoff"] = os.path.join(out_dir, "tradeoff.png")
  fig.tight_layout()
  fig.savefig(paths["tradeoff"], dpi=120)
  plt.close(fig)

  rules = length_scores.RULES
  targets = [k for k in report["length_instruction"][rules[0]] if k != "mean_score"]
  fig, axes = plt.subplots(1, len(rules), figsize=(4 * len(rules), 3.5), sharey=True)
  for ax, rule in zip(axes, rules):
    x = np.arange(len(targets))
    for offset, side in ((-0.2, "unguided"), (0.2, "guided")):
      ax.bar(x + offset, [report["length_instruction"][rule][t][side]["score"] for t in targets], 0.4, label=side)
    ax.set(xticks=x, xticklabels=targets, xlabel="target length", title=rule)
  axes[0].set_ylabel("LIFEBench score")
  axes[0].legend()
  paths["score_table"] = os.path.join(out_dir, "score_table.png")
  fig.tight_layout()
  fig.savefig(paths["score_table"], dpi=120)
  plt.close(fig)
  return paths


def main(argv):
  del argv
  explicit_eos = cli.int_list("eos_ids", _EOS.value)
  # EOS ids the run's model cannot emit are refused before anything loads (again below against the generator).
  check_in_vocabulary(explicit_eos, config_history.read_config(_RUN.workdir.value).model.vocab_size,
                      f"--eos_ids={','.join(_EOS.value or ())}")
  predictor = cli.load_predictor(_RUN)
  gamma = predictor.kind.gamma  # The trained value's discount ("auto" resolved at training).
  config = predictor.config if _CONFIG.value is None else RunConfig.from_dict(_CONFIG.value).with_gamma(gamma)
  targets = [int(t) for t in _TARGETS.value]
  betas = [float(b) for b in _BETAS.value]
  with cli.user_errors(ValueError, FileNotFoundError):  # A generator the run cannot drive, a missing eval split.
    name, models, params = _models(predictor, config, _GENERATOR.value)
    source = pipeline.load_source(config, "eval")
    eos_ids = eos_ids_for(models, [source[i] for i in range(min(_TRAJECTORIES.value, len(source)))])
  # A --config of another vocabulary makes a synthetic generator the LenVM cannot read; EOS ids must be emittable.
  check_same_vocabulary(models.vocab_size, predictor.config.model.vocab_size,
                        f"--config ({name})" if _CONFIG.value is not None else name, f"--workdir={_RUN.workdir.value}",
                        "give a --config with the run's model.vocab_size, or leave --config out (the run's own)")
  check_in_vocabulary(eos_ids, models.vocab_size, "--eos_ids" if explicit_eos else
                      "the synthetic policy's EOS id" if name == "synthetic policy" else
                      f"--tokenizer={_TOKENIZER.value}, its EOS" if _TOKENIZER.value else
                      "the EOS ids read from the run's eval data (give --eos_ids)", "the generator")
  count = min(_PROMPTS.value, len(source))
  if count == 0:  # Before any generation: a report from no prompts would say nothing.
    raise errors.UserError.at("the eval split has no prompts", f"--workdir={_RUN.workdir.value}",
                              "evaluate a run whose data has an eval split (data.eval_path)")
  trajectories = [source[i] for i in range(min(_TRAJECTORIES.value, len(source)))]
  prompts = [source[i].prompt_ids.tolist() for i in range(count)]
  mesh = sharding.make_mesh(1, 1, 1)  # The Predictor's: its params live on one device.
  batch = _BATCH.value
  with cli.user_errors(ValueError):
    options = sampling_flags.resolve()
    options.config(1, eos_ids, _SEED.value)  # A bad filter value fails here, naming its flag.

  def sampler(max_new_tokens, candidates=None):
    sampling = options.config(max_new_tokens, eos_ids, _SEED.value)
    return GuidedSampler(models, params, sampling, mesh, num_candidates=candidates or options.candidates,
                         batch_size=batch)

  def unguided(max_new_tokens):
    """The baseline: the whole filtered distribution (--unguided=full), or the guided run's candidates."""
    if options.unguided == "candidates":
      return sampler(max_new_tokens).generate(prompts, [options.unguided_request()] * len(prompts))
    if name == "shared trunk":
      return Sampler(predictor.graphdef, predictor.params, options.config(max_new_tokens, eos_ids, _SEED.value), mesh,
                     batch_size=batch).generate(prompts)
    # The synthetic policy as a generator: every token a candidate, scored by the exact table (cheap, and unused).
    full = Pair(models.generator, SyntheticScorer(models.generator.policy, gamma))
    return GuidedSampler(full, (None, None), options.config(max_new_tokens, eos_ids, _SEED.value), mesh,
                         num_candidates=full.vocab_size, batch_size=batch).generate(prompts,
                                                                                    [LengthRequest()] * len(prompts))

  with cli.user_errors(ValueError):
    if not 1 <= options.candidates <= models.vocab_size:
      raise ValueError(f"--candidates must lie in [1, {models.vocab_size}], got {options.candidates}")
  report = {"checkpoint_step": predictor.step, "generator": name, "gamma": gamma, "eos_ids": list(eos_ids),
            "length_rules": options.length_rules, "num_candidates": options.candidates, "prompts": count,
            "sampling": options.describe()}
  limit = 2 * max(targets)
  stages = progress.ProgressLine("evaluate", 2 + len(length_scores.RULES) + len(betas))  # Decodes + predictions.
  baseline = unguided(limit)
  stages.advance()
  report["length_instruction"] = length_instruction(sampler(limit), baseline, prompts, targets, options,
                                                    stages.advance)
  report["quality_vs_length"] = {"budget": _BUDGET.value, "accuracy": "emits EOS within the budget",
                                 "sweep": quality_vs_length(sampler(_BUDGET.value), prompts, betas, options,
                                                            stages.advance)}
  predictions = predictor.predict(trajectories, max_len=config.data.max_len)
  stages.advance()
  report["length_tokens"] = length_tokens.length_tokens(
      ((t.completion_ids[:len(v) - 1], v) for t, (v, _) in zip(trajectories, predictions)), gamma,
      _THRESHOLD.value or max(0.01, 2 * (1 - gamma)))
  report["scorer"] = _SCORER.value
  out_dir = os.path.join(_RUN.workdir.value, "evaluate" if _SCORER.value == "next_state" else f"evaluate_{_SCORER.value}")
  os.makedirs(out_dir, exist_ok=True)
  report["plots"] = _plots(out_dir, report, trajectories, predictions, gamma)
  files.write_report(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1), items=count, what="prompts",
                     where=f"--workdir={_RUN.workdir.value}")
  print(format_report(report))
  print(f"report and plots in {out_dir}")


def format_report(report: dict) -> str:
  settings = report.get("sampling", {})
  lines = [f"checkpoint {report['checkpoint_step']}, generator: {report['generator']}, "
           f"scorer: {report.get('scorer', 'next_state')}, k = {report['num_candidates']}, "
           f"{report['prompts']} prompts, length rules: {report.get('length_rules', 'paper')}"
           + (f", sampling: {settings['settings']} (T {settings['temperature']:g}, top-k {settings['top_k']}, "
              f"top-p {settings['top_p']:g}, min-p {settings['min_p']:g}, {settings['filter_style']} filter; "
              f"unguided: {settings['unguided']})" if settings else ""),
           "LIFEBench score, mean length and shares of empty / cut answers, unguided -> guided:"]
  side = lambda v: (f"{v['score']:5.1f} len {v['mean_length']:6.1f}" + (
      f" empty {v['empty']:.2f} cut {v['cut']:.2f}" if "empty" in v else ""))
  for rule, by_target in report["length_instruction"].items():
    for t, v in by_target.items():
      if t != "mean_score":
        lines.append(f"  {rule:<9} {t:>5}: {side(v['unguided'])}  ->  {side(v['guided'])}")
    mean = by_target["mean_score"]
    lines.append(f"  {rule:<9}  mean score: {mean['unguided']:.1f} -> {mean['guided']:.1f}")
  lines.append(f"tilt sweep (budget {report['quality_vs_length']['budget']}): " + ", ".join(
      f"beta {p['beta']:g}: acc {p['accuracy']:.2f} len {p['mean_length']:.1f}"
      for p in report["quality_vs_length"]["sweep"]))
  tokens = report["length_tokens"]
  fmt = lambda entries: ", ".join(f"{e['token']} ({e['count']}/{e['occurrences']})" for e in entries[:6])
  lines.append(f"lengthening tokens: {fmt(tokens['lengthening'])}")
  lines.append(f"shortening tokens:  {fmt(tokens['shortening'])}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main)
