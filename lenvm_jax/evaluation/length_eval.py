"""Held-out length evaluation (spec section 4) next to baselines fit on the training split.

Two views, each with the model and two baselines computed on exactly the same states:
  * per-token length MAE: |n_hat - n| at every state s_t of every held-out completion (cut at max_len as in
    training); baselines: the best constant (median remaining length of the training tokens) and a predictor that
    knows only the position t in the completion and the generator (median remaining length of training tokens of
    that generator in t's position bucket);
  * prompt-boundary MRE: per (prompt, generator) group, L_GT = log(1 - mean(1 - gamma ** L_i)) / log(gamma), the
    model's L_hat from V(s_0); baselines: the one L, and one L per generator, with the least MRE on the training
    groups (a 1/L_GT-weighted median: lower, so stronger, than the L_GT of the pooled training groups, which is what a
    prompt-blind LenVM would predict).
"""

import collections
import dataclasses

import numpy as np

from lenvm_jax.data.prompt_groups import (BOUNDARY_GROUPINGS, boundary_groups, generator_of, group_by_prompt,
                                          group_key)
from lenvm_jax.evaluation.prompt_boundary import (ALL_GENERATORS, cell_mean_lengths, least_mre_by_generator,
                                                  least_mre_length, prompt_boundary_mre, scope_label)
from lenvm_jax.value.targets import prompt_boundary_length

# Position buckets 0, 1-2, 3-6, 7-14, ...: fine where lengths change fast, coarse in the long tail.
position_bucket = lambda t: np.floor(np.log2(np.asarray(t) + 1)).astype(np.int64)


def prompt_boundary_report(predictor, trajectories, gamma: float, batch_size: int = 16,
                           max_prompt_len: int = 0, grouping: str = "finished", samples_per_prompt: int = 0) -> dict:
  """Spec section 4 on sampled completions: group trajectories by (prompt, generator) (prompt_groups.boundary_groups:
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

  def remaining_by_position(self, generator: str, t: np.ndarray) -> np.ndarray:
    table = self.position_remaining.get(generator, self.position_remaining[ALL_GENERATORS])
    fallback = self.position_remaining[ALL_GENERATORS]
    buckets = position_bucket(t)
    picked = np.where(buckets < len(table), table[np.minimum(buckets, len(table) - 1)], np.nan)
    return np.where(np.isnan(picked), fallback[np.minimum(buckets, len(fallback) - 1)], picked)


def fit_baselines(trajectories, gamma: float) -> LengthBaselines:
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
      generator_prompt_length=least_mre_by_generator(truths))


def evaluate(predictor, trajectories, baselines: LengthBaselines, gamma: float, max_len: int,
             batch_size: int = 16, max_prompt_len: int = 0, cell_of=None, grouping: str = "finished",
             samples_per_prompt: int = 0) -> dict:
  """{"token_mae": {...}, "prompt_mre": {...}}, each {"model", "constant", "position" or "generator"} overall and
  per generator, on the finished held-out trajectories; "prompt_calibration": {"model", "true"} mean-return lengths
  at s_0. cell_of(group key) adds a "cell_mean" MRE: the model's L_hat averaged (in return) within each cell.
  grouping / samples_per_prompt pick the prompt-boundary groups (prompt_groups.boundary_groups)."""
  finished = [t for t in trajectories if t.finished]
  predictions = predictor.predict(finished, batch_size=batch_size, max_len=max_len, max_prompt_len=max_prompt_len)
  errors = collections.defaultdict(lambda: collections.defaultdict(list))
  boundary_lengths = collections.defaultdict(lambda: collections.defaultdict(list))
  for t, (_, n_hat) in zip(finished, predictions):
    steps = np.arange(len(n_hat))
    n = len(t.completion_ids) - steps
    for scope in (ALL_GENERATORS, generator_of(t)):
      boundary_lengths[scope]["model"].append(n_hat[0])
      boundary_lengths[scope]["true"].append(len(t.completion_ids))
      errors[scope]["model"].append(np.abs(n_hat - n))
      errors[scope]["constant"].append(np.abs(baselines.constant_remaining - n))
      errors[scope]["position"].append(np.abs(baselines.remaining_by_position(generator_of(t), steps) - n))
  token_mae = {scope: {name: float(np.mean(np.concatenate(v))) for name, v in by.items()}
               for scope, by in errors.items()}

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
    guesses = {"model": boundary, "constant": lambda key: baselines.constant_prompt_length,
               "generator": lambda key: baselines.generator_prompt_length.get(key[1],
                                                                              baselines.constant_prompt_length)}
    if cell_of is not None:
      guesses["cell_mean"] = cell_mean_lengths(boundary, cell_of, gamma)
    return groups_, {name: prompt_boundary_mre(groups_, guess, gamma) for name, guess in guesses.items()}

  groups, by_name = boundary_mre(grouping)
  prompt_mre = {scope: {name: by_name[name][scope] for name in by_name} for scope in by_name["model"]}
  # Both definitions side by side (all generators): ours (finished completions) and the reference's (every sample,
  # a cut one at its token count); they differ where many answers were cut.
  both = {grouping: (groups, by_name)}
  other = next(g for g in BOUNDARY_GROUPINGS if g != grouping)
  both[other] = boundary_mre(other)
  prompt_mre_by_grouping = {g: {"groups": len(gs), **{name: v.get(ALL_GENERATORS, float("nan")) for name, v in
                                                       names.items() if name in ("model", "constant")}}
                            for g, (gs, names) in both.items()}
  # Calibration at s_0: the length of the mean predicted return against that of the mean realised return, overall and
  # per generator. MSE training makes them equal on the training completions; apart, they show a biased V(s_0).
  calibration = {scope: {name: prompt_boundary_length(v, gamma) for name, v in by.items()}
                 for scope, by in boundary_lengths.items()}
  counts = {"trajectories": len(finished), "prompt_groups": len(groups),
            "tokens": int(sum(len(p[1]) for p in predictions))}
  return {"token_mae": token_mae, "prompt_mre": prompt_mre, "prompt_calibration": calibration, "counts": counts,
          "prompt_mre_by_grouping": prompt_mre_by_grouping}


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
  return "\n".join(lines)


def format_summary(reports: dict) -> str:
  """One line per run (workdir -> report): the all-generator MRE and MAE next to the baselines they must beat."""
  lines = [f"{'run':<36} {'MRE':>8} {'const':>8} {'beats':>6}   {'MAE':>8} {'position':>8} {'beats':>6}"]
  for workdir, report in reports.items():
    mre, mae = report["prompt_mre"][ALL_GENERATORS], report["token_mae"][ALL_GENERATORS]
    lines.append(f"{workdir:<36} {mre['model']:8.4f} {mre['constant']:8.4f} {str(mre['model'] < mre['constant']):>6}"
                 f"   {mae['model']:8.3f} {mae['position']:8.3f} {str(mae['model'] < mae['position']):>6}")
  return "\n".join(lines)
