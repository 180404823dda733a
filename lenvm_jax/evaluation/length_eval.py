"""Held-out length evaluation (docs/method.md §8) next to baselines fit on the training split.

Two views, each with the model and two baselines computed on exactly the same states:
  * per-token length MAE: |n_hat - n| at every state s_t of every held-out completion (cut at max_len as in
    training); baselines: the best constant (median remaining length of the training tokens) and a predictor that
    knows only the position t in the completion and the generator (median remaining length of training tokens of
    that generator in t's position bucket); per-token MRE |n_hat - n| / n under two definitions (TOKEN_MRE_DEFINITIONS):
    ours leaves the EOS state (n = 0) out, the reference's counts it as 0 error in the denominator, so its number is
    ours times the share of non-EOS states; at positions 0 / 25 / 50 / 75 % the two also pick states differently;
  * prompt-boundary MRE: per (prompt, generator) group, L_GT = log(1 - mean(1 - gamma ** L_i)) / log(gamma), the
    model's L_hat from V(s_0); baselines: the one L, and one L per generator, with the least MRE on the training
    groups (a 1/L_GT-weighted median: lower, so stronger, than the L_GT of the pooled training groups, which is what a
    prompt-blind LenVM would predict), and two prompt-only predictors (evaluation/prompt_features.py): the task's
    least-MRE length, and a within-task fit on surface features of the prompt.
Both views come with bootstrap intervals over held-out problems (evaluation/bootstrap.py), per predictor and paired
against the model.
"""

import collections
import dataclasses

import numpy as np

from lenvm_jax.data.prompt_groups import (BOUNDARY_GROUPINGS, boundary_groups, generator_of, group_by_prompt,
                                          group_key, problem_of)
from lenvm_jax.evaluation import bootstrap
from lenvm_jax.evaluation.prompt_boundary import (ALL_GENERATORS, cell_mean_lengths, least_mre_by_generator,
                                                  least_mre_length, prompt_boundary_errors, prompt_boundary_mre,
                                                  scope_label)
from lenvm_jax.evaluation.prompt_features import PromptPredictors, fit_prompt_predictors, prompt_features
from lenvm_jax.value.metrics import POSITION_FRACTIONS
from lenvm_jax.value.targets import prompt_boundary_length

# Position buckets 0, 1-2, 3-6, 7-14, ...: fine where lengths change fast, coarse in the long tail.
position_bucket = lambda t: np.floor(np.log2(np.asarray(t) + 1)).astype(np.int64)


def problem_unit(key):
  """The bootstrap's unit for a group key: its problem (all settings and generators of it together)."""
  return problem_of(key[0]) if isinstance(key[0], str) else key[0]


def group_features(trajectories, describe=None) -> dict:
  """{group key: prompt_features} of each group's prompt; describe(prompt_ids) -> text adds the text features."""
  features = {}
  for t in trajectories:
    key = group_key(t)
    if key not in features:
      features[key] = prompt_features(t.prompt_ids, describe(t.prompt_ids.tolist()) if describe else None)
  return features


# How each definition computes the per-token MRE (printed beside the numbers).
TOKEN_MRE_DEFINITIONS = {
    "ours": "EOS left out: mean of |n_hat - n| / n over states with n > 0; at f %: the state t = floor(f L)",
    "reference": "the reference's: EOS counted as 0 error, every state in the denominator; at f %: the state "
                 "floor(f (S - 1)) of the S states in the row, EOS included",
}


def token_relative_errors(n_hat, n, definition: str) -> tuple[float, int]:
  """(sum, count) of per-token relative length errors over one completion's states, whose true remaining lengths
  are n (the EOS state has n = 0), under `definition` (TOKEN_MRE_DEFINITIONS). The reference's trainer logs
  len_rel_loss as sum(n > 0 ? |n_hat - n| / n : 0) over its value mask (the prompt's last token through EOS) divided
  by the mask's size: EOS adds 0 to the sum and 1 to the count."""
  n_hat, n = np.asarray(n_hat, np.float64), np.asarray(n, np.float64)
  known = n > 0
  errors = np.abs(n_hat[known] - n[known]) / n[known]
  if definition == "ours":
    return float(errors.sum()), int(known.sum())
  if definition == "reference":
    return float(errors.sum()), len(n)
  raise ValueError(f"unknown per-token MRE definition {definition!r}; one of {list(TOKEN_MRE_DEFINITIONS)}")


def position_state(length: int, states: int, fraction: int, definition: str) -> int | None:
  """The state t scored at `fraction` % of a completion of `length` tokens of which `states` states (s_0 ..) are in
  the row, or None when that definition scores none: ours takes t = floor(f L) (value/metrics.py) if it is in the row
  and not EOS; the reference ranks the row's states and takes rank floor(f (states - 1)) (EOS included)."""
  if definition == "ours":
    t = length * fraction // 100
    return t if t < states and t < length else None
  if definition == "reference":
    return (states - 1) * fraction // 100 if states else None
  raise ValueError(f"unknown per-token MRE definition {definition!r}; one of {list(TOKEN_MRE_DEFINITIONS)}")


def prompt_boundary_report(predictor, trajectories, gamma: float, batch_size: int = 16,
                           max_prompt_len: int = 0, grouping: str = "finished", samples_per_prompt: int = 0) -> dict:
  """docs/method.md §8 on sampled completions: group trajectories by (prompt, generator) (prompt_groups.boundary_groups:
  finished ones, or the reference's rule), L_GT from the mean of gamma ** L_i, L_hat from the model's V(s_0); MRE
  overall ("*") and per generator, plus every group."""
  groups = boundary_groups(trajectories, grouping, samples_per_prompt)
  if not groups:
    raise ValueError("prompt-boundary evaluation needs finished trajectories" if grouping == "finished" else
                     "prompt-boundary evaluation found no prompt group with the wanted number of samples")
  first = {}
  for t in trajectories:
    if group_key(t) in groups:
      first.setdefault(group_key(t), t)
  keys = list(groups)
  _, predicted = predictor.predict_prompts([first[k] for k in keys], batch_size, max_prompt_len)
  l_hat = dict(zip(keys, predicted.tolist()))
  rows = [{"prompt": k[0] if isinstance(k[0], str) else list(k[0]), "generator": k[1], "samples": len(groups[k]),
           "true_length": prompt_boundary_length(groups[k], gamma), "predicted_length": l_hat[k]} for k in keys]
  return {"mre": prompt_boundary_mre(groups, l_hat, gamma), "prompt_groups": len(keys), "grouping": grouping,
          "groups": rows}


@dataclasses.dataclass(frozen=True)
class LengthBaselines:
  constant_remaining: float
  position_remaining: dict  # generator (or ALL_GENERATORS) -> median remaining length per position bucket
  constant_prompt_length: float
  generator_prompt_length: dict
  prompt_predictors: PromptPredictors  # The task-only and within-task feature predictors at the prompt boundary.

  def remaining_by_position(self, generator: str, t: np.ndarray) -> np.ndarray:
    table = self.position_remaining.get(generator, self.position_remaining[ALL_GENERATORS])
    fallback = self.position_remaining[ALL_GENERATORS]
    buckets = position_bucket(t)
    picked = np.where(buckets < len(table), table[np.minimum(buckets, len(table) - 1)], np.nan)
    return np.where(np.isnan(picked), fallback[np.minimum(buckets, len(fallback) - 1)], picked)


def fit_baselines(trajectories, gamma: float, describe=None) -> LengthBaselines:
  """Every baseline from the training trajectories; describe(prompt_ids) -> text lets the feature predictor read
  numbers and words (without it, only the prompt's token count)."""
  finished = [t for t in trajectories if t.finished]
  if not finished:
    raise ValueError("baselines need finished training completions")
  remaining, buckets, generators = [], [], []
  for t in finished:
    length = len(t.completion_ids)
    steps = np.arange(length + 1)
    remaining.append(length - steps)
    buckets.append(position_bucket(steps))
    generators.append(np.full(length + 1, generator_of(t), dtype=object))
  remaining, buckets, generators = map(np.concatenate, (remaining, buckets, generators))

  def table(mask):
    out = np.full(buckets.max() + 1, np.nan)
    for b in np.unique(buckets[mask]):
      out[b] = np.median(remaining[mask & (buckets == b)])
    return out

  position = {ALL_GENERATORS: table(np.ones_like(remaining, bool))}
  for name in sorted(set(generators.tolist())):
    position[name] = table(generators == name)
  truths = {key: prompt_boundary_length(lengths, gamma) for key, lengths in group_by_prompt(finished).items()}
  return LengthBaselines(
      constant_remaining=float(np.median(remaining)), position_remaining=position,
      constant_prompt_length=least_mre_length(list(truths.values())),
      generator_prompt_length=least_mre_by_generator(truths),
      prompt_predictors=fit_prompt_predictors(truths, group_features(finished, describe)))


def evaluate(predictor, trajectories, baselines: LengthBaselines, gamma: float, max_len: int,
             batch_size: int = 16, max_prompt_len: int = 0, cell_of=None, grouping: str = "finished",
             samples_per_prompt: int = 0, describe=None, bootstrap_seed: int = 0) -> dict:
  """{"token_mae": {...}, "prompt_mre": {...}}, each {"model", "constant", "position" or "generator"} overall and
  per generator, on the finished held-out trajectories; "prompt_calibration": {"model", "true"} mean-return lengths
  at s_0. cell_of(group key) adds a "cell_mean" MRE: the model's L_hat averaged (in return) within each cell.
  grouping / samples_per_prompt pick the prompt-boundary groups (prompt_groups.boundary_groups). describe: as in
  fit_baselines (use the same). "intervals": bootstrap intervals over held-out problems of the all-generator per-token
  MAE and prompt-boundary MRE of every predictor, and of each one's difference from the model's (paired)."""
  finished = [t for t in trajectories if t.finished]
  predictions = predictor.predict(finished, batch_size=batch_size, max_len=max_len, max_prompt_len=max_prompt_len)
  errors = collections.defaultdict(lambda: collections.defaultdict(list))
  boundary_lengths = collections.defaultdict(lambda: collections.defaultdict(list))
  # [definition][scope][name] and [definition][fraction][name] -> [sum, count] of relative errors.
  relative = {d: collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
              for d in TOKEN_MRE_DEFINITIONS}
  relative_at = {d: {f: collections.defaultdict(lambda: [0.0, 0]) for f in POSITION_FRACTIONS}
                 for d in TOKEN_MRE_DEFINITIONS}
  for t, (_, n_hat) in zip(finished, predictions):
    steps = np.arange(len(n_hat))
    length = len(t.completion_ids)
    n = length - steps
    guesses = {"model": np.asarray(n_hat, np.float64), "constant": np.full(len(n), baselines.constant_remaining),
               "position": baselines.remaining_by_position(generator_of(t), steps)}
    for scope in (ALL_GENERATORS, generator_of(t)):
      boundary_lengths[scope]["model"].append(n_hat[0])
      boundary_lengths[scope]["true"].append(length)
      for name, guess in guesses.items():
        errors[scope][name].append(np.abs(guess - n))
        for definition in TOKEN_MRE_DEFINITIONS:
          total, count = token_relative_errors(guess, n, definition)
          relative[definition][scope][name][0] += total
          relative[definition][scope][name][1] += count
    for definition in TOKEN_MRE_DEFINITIONS:
      for f in POSITION_FRACTIONS:
        at = position_state(length, len(n), f, definition)
        if at is None:
          continue
        for name, guess in guesses.items():
          total, count = token_relative_errors(guess[at:at + 1], n[at:at + 1], definition)
          relative_at[definition][f][name][0] += total
          relative_at[definition][f][name][1] += count
  token_mae = {scope: {name: float(np.mean(np.concatenate(v))) for name, v in by.items()}
               for scope, by in errors.items()}
  ratio = lambda pair: pair[0] / pair[1] if pair[1] else float("nan")
  token_mre = {d: {scope: {name: ratio(pair) for name, pair in by.items()} for scope, by in by_scope.items()}
               for d, by_scope in relative.items()}
  token_mre_at = {d: {str(f): {name: ratio(pair) for name, pair in by.items()} for f, by in by_f.items()}
                  for d, by_f in relative_at.items()}

  def boundary_mre(grouping_):
    groups_ = boundary_groups(trajectories, grouping_, samples_per_prompt)
    # The same prompt gives the same V(s_0), so any member's first prediction is the group's L_hat.
    boundary = {group_key(t): float(n_hat[0]) for t, (_, n_hat) in zip(finished, predictions)
                if group_key(t) in groups_}
    # Groups of unfinished samples only (reference grouping) have no per-token prediction: their prompt alone.
    unscored = {group_key(t): t for t in trajectories if group_key(t) in groups_ and group_key(t) not in boundary}
    if unscored:
      _, lengths = predictor.predict_prompts(list(unscored.values()), batch_size, max_prompt_len)
      boundary.update(zip(unscored, map(float, lengths)))
    predictors = baselines.prompt_predictors
    guesses = {"model": boundary, "constant": lambda key: baselines.constant_prompt_length,
               "generator": lambda key: baselines.generator_prompt_length.get(key[1],
                                                                              baselines.constant_prompt_length),
               "task": predictors.task, "features": lambda key: predictors.features(key, features[key])}
    if cell_of is not None:
      guesses["cell_mean"] = cell_mean_lengths(boundary, cell_of, gamma)
    return groups_, {name: prompt_boundary_mre(groups_, guess, gamma) for name, guess in guesses.items()}, guesses

  features = group_features(trajectories, describe)  # Both groupings' groups are among these.
  groups, by_name, boundary_guesses = boundary_mre(grouping)
  prompt_mre = {scope: {name: by_name[name][scope] for name in by_name} for scope in by_name["model"]}
  # Both definitions side by side (all generators): ours (finished completions) and the reference's (every sample,
  # a cut one at its token count); they differ where many answers were cut.
  both = {grouping: (groups, by_name)}
  other = next(g for g in BOUNDARY_GROUPINGS if g != grouping)
  both[other] = boundary_mre(other)[:2]
  prompt_mre_by_grouping = {g: {"groups": len(gs), **{name: v.get(ALL_GENERATORS, float("nan")) for name, v in
                                                       names.items() if name in ("model", "constant")}}
                            for g, (gs, names) in both.items()}
  # Calibration at s_0: the length of the mean predicted return against that of the mean realised return, overall and
  # per generator. MSE training makes them equal on the training completions; apart, they show a biased V(s_0).
  calibration = {scope: {name: prompt_boundary_length(v, gamma) for name, v in by.items()}
                 for scope, by in boundary_lengths.items()}
  # eos_states: completions whose EOS state is in the row (not cut at max_len): what the two per-token MREs differ by.
  counts = {"trajectories": len(finished), "prompt_groups": len(groups),
            "tokens": int(sum(len(p[1]) for p in predictions)),
            "eos_states": sum(len(p[1]) == len(t.completion_ids) + 1 for t, p in zip(finished, predictions))}
  intervals = {"unit": "problem", "resamples": bootstrap.RESAMPLES, "level": bootstrap.LEVEL, "seed": bootstrap_seed}
  # errors[ALL_GENERATORS][name] holds one array per finished completion, in `finished` order.
  units, sums, states = bootstrap.per_unit_sums(
      [problem_unit(group_key(t)) for t in finished],
      {name: [(float(e.sum()), len(e)) for e in per_completion]
       for name, per_completion in errors[ALL_GENERATORS].items()})
  intervals["token_mae"] = {"problems": len(units), **bootstrap.ratio_intervals(sums, states, "model",
                                                                                  seed=bootstrap_seed)}
  units, sums, count = bootstrap.per_unit_sums(
      [problem_unit(key) for key in groups],
      {name: [(error, 1) for error in prompt_boundary_errors(groups, guess, gamma)]
       for name, guess in boundary_guesses.items()})
  intervals["prompt_mre"] = {"problems": len(units), **bootstrap.ratio_intervals(sums, count, "model",
                                                                                   seed=bootstrap_seed)}
  return {"token_mae": token_mae, "prompt_mre": prompt_mre, "prompt_calibration": calibration, "counts": counts,
          "prompt_mre_by_grouping": prompt_mre_by_grouping, "token_mre": token_mre, "token_mre_at": token_mre_at,
          "intervals": intervals, "prompt_predictors": baselines.prompt_predictors.describe()}


def format_report(report: dict) -> str:
  """The tables experiments.evaluate_lengths prints for one report of `evaluate`."""
  mre_title, mre_columns = "prompt-boundary MRE: model / best constant / generator baseline", ("model", "constant",
                                                                                                 "generator")
  if "cell_mean" in report["prompt_mre"][ALL_GENERATORS]:  # evaluate_lengths --cell_separator.
    mre_title, mre_columns = mre_title + " / model's cell mean", mre_columns + ("cell_mean",)
  tables = (("per-token length MAE (tokens): model / best constant / position baseline", "token_mae",
             ("model", "constant", "position")),
            (mre_title, "prompt_mre", mre_columns),
            ("prompt-boundary calibration (length of the mean return at s_0): model / true", "prompt_calibration",
             ("model", "true")))
  lines = [f"held-out: {report['counts']}"]
  for title, key, columns in tables:
    lines.append(title)
    for scope, values in sorted(report[key].items()):
      lines.append(f"  {scope_label(scope):<24} " + " ".join(f"{values[c]:10.4g}" for c in columns))
  described = {"finished": "ours: finished completions only", "reference": "the reference's: every sample, a cut "
               "one at its token count, equal group sizes"}
  if "prompt_mre_by_grouping" in report:
    lines.append("prompt-boundary MRE under both groupings (all generators): model / best constant, groups")
    for name, values in report["prompt_mre_by_grouping"].items():
      model, constant = values.get("model", float("nan")), values.get("constant", float("nan"))
      lines.append(f"  {name:<10} {model:10.4g} {constant:10.4g} {values['groups']:6d}  ({described[name]})")
  if "token_mre" in report:
    columns = ("model", "constant", "position")
    lines.append("per-token length MRE under both definitions: model / best constant / position baseline")
    for definition, text in TOKEN_MRE_DEFINITIONS.items():
      lines.append(f"  {definition}: {text}")
    for scope in sorted(report["token_mre"]["ours"]):
      for definition in TOKEN_MRE_DEFINITIONS:
        values = report["token_mre"][definition][scope]
        lines.append(f"  {scope_label(scope):<24} {definition:<10} " + " ".join(f"{values[c]:10.4g}" for c in columns))
    lines.append("per-token length MRE at relative positions (all generators): model / best constant / position")
    for f in report["token_mre_at"]["ours"]:
      for definition in TOKEN_MRE_DEFINITIONS:
        values = report["token_mre_at"][definition][f]
        lines.append(f"  {f + '%':<24} {definition:<10} " + " ".join(f"{values.get(c, float('nan')):10.4g}"
                                                                 for c in columns))
  if "intervals" in report:
    lines.extend(format_intervals(report))
  return "\n".join(lines)


def format_intervals(report: dict) -> list[str]:
  """Each predictor's all-generator metric, its bootstrap interval and its paired difference from the model's."""
  intervals = report["intervals"]
  lines = [f"prompt predictors (least-MRE length per task on the training groups): {report['prompt_predictors']}",
           f"bootstrap {intervals['level']:.0%} intervals over held-out problems ({intervals['resamples']} resamples, "
           "seed {}); 'minus model' > 0: the model is better".format(intervals["seed"])]
  for metric, title in (("token_mae", "per-token MAE"), ("prompt_mre", "prompt-boundary MRE")):
    values = report[metric][ALL_GENERATORS]
    lines.append(f"  {title} ({intervals[metric]['problems']} problems): value [interval], minus model [interval]")
    for name, interval in intervals[metric]["interval"].items():
      paired = intervals[metric]["minus_reference"].get(name)
      lines.append(f"    {name:<10} {values[name]:8.4g} {bootstrap.format_interval(interval):<22}"
                   + (f" {bootstrap.format_interval(paired)}" if paired else ""))
  return lines


def format_summary(reports: dict) -> str:
  """One line per run (workdir -> report): the all-generator MRE and MAE next to the baselines they must beat, then
  (reports with intervals) every predictor's value and bootstrap interval per run."""
  lines = [f"{'run':<36} {'MRE':>8} {'const':>8} {'beats':>6}   {'MAE':>8} {'position':>8} {'beats':>6}"]
  for workdir, report in reports.items():
    mre, mae = report["prompt_mre"][ALL_GENERATORS], report["token_mae"][ALL_GENERATORS]
    lines.append(f"{workdir:<36} {mre['model']:8.4f} {mre['constant']:8.4f} {str(mre['model'] < mre['constant']):>6}"
                 f"   {mae['model']:8.3f} {mae['position']:8.3f} {str(mae['model'] < mae['position']):>6}")
  with_intervals = {w: r for w, r in reports.items() if "intervals" in r}
  for metric, title in (("prompt_mre", "prompt-boundary MRE"), ("token_mae", "per-token MAE")) if with_intervals else ():
    lines.append(f"{title} with bootstrap intervals over held-out problems:")
    for workdir, report in with_intervals.items():
      cells = [f"{name} {report[metric][ALL_GENERATORS][name]:.4g} {bootstrap.format_interval(interval)}"
               for name, interval in report["intervals"][metric]["interval"].items()]
      lines.append(f"  {workdir}: " + "; ".join(cells))
  return "\n".join(lines)
