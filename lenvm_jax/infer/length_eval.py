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

# Position buckets 0, 1-2, 3-6, 7-14, ...: fine where lengths change fast, coarse in the long tail.
position_bucket = lambda t: np.floor(np.log2(np.asarray(t) + 1)).astype(np.int64)
ALL_GENERATORS = "*"


def prompt_boundary_length(lengths, gamma: float) -> float:
  """L_GT of a prompt from its sampled completion lengths: the length whose return is the mean return."""
  # log(1 - mean return) = log(mean(gamma ** L)), summed in log space: gamma ** L underflows to 0 for long L.
  log_terms = np.asarray(lengths, np.float64) * np.log(gamma)
  top = log_terms.max()
  return float((top + np.log(np.mean(np.exp(log_terms - top)))) / np.log(gamma))


def least_mre_length(true_lengths) -> float:
  """The constant c minimising mean |c - L| / max(L, 1) over the given L_GT: their median weighted by 1 / max(L, 1)."""
  lengths = np.sort(np.asarray(true_lengths, np.float64))
  cumulative = np.cumsum(1.0 / np.maximum(lengths, 1.0))
  return float(lengths[np.searchsorted(cumulative, cumulative[-1] / 2)])


def _generator(t) -> str:
  return t.generator or "unknown"


def _group_key(t):
  return (t.prompt_id if t.prompt_id is not None else tuple(t.prompt_ids.tolist()), _generator(t))


def group_by_prompt(trajectories) -> dict:
  """{(prompt id or prompt tokens, generator): [completion lengths]} of the finished trajectories."""
  groups = collections.defaultdict(list)
  for t in trajectories:
    if t.finished:
      groups[_group_key(t)].append(len(t.completion_ids))
  return dict(groups)


def prompt_boundary_mre(groups: dict, predicted: dict, gamma: float) -> dict:
  """Spec section 4 MRE: mean over prompt groups of |L_hat - L_GT| / L_GT, overall ("*") and per generator.

  groups: {(prompt, generator): [lengths]} (group_by_prompt); predicted: {same key: L_hat} or a function of the
  key. L_GT below 1 token counts as 1 so a prompt answered by EOS alone does not divide by ~0.
  """
  guess = predicted if callable(predicted) else predicted.__getitem__
  relative = collections.defaultdict(list)
  for key, lengths in groups.items():
    truth = prompt_boundary_length(lengths, gamma)
    error = abs(guess(key) - truth) / max(truth, 1.0)
    relative[ALL_GENERATORS].append(error)
    relative[key[1]].append(error)
  return {scope: float(np.mean(v)) for scope, v in relative.items()}


def prompt_boundary_report(predictor, trajectories, gamma: float, batch_size: int = 16,
                           max_prompt_len: int = 0) -> dict:
  """Spec section 4 on sampled completions: group finished trajectories by (prompt, generator), L_GT from the
  mean of gamma ** L_i, L_hat from the model's V(s_0); MRE overall ("*") and per generator, plus every group."""
  groups = group_by_prompt(trajectories)
  if not groups:
    raise ValueError("prompt-boundary evaluation needs finished trajectories")
  first = {}
  for t in trajectories:
    if t.finished:
      first.setdefault(_group_key(t), t)
  keys = list(groups)
  _, predicted = predictor.predict_prompts([first[k] for k in keys], batch_size, max_prompt_len)
  l_hat = dict(zip(keys, predicted.tolist()))
  rows = [{"prompt": k[0] if isinstance(k[0], str) else list(k[0]), "generator": k[1], "samples": len(groups[k]),
           "true_length": prompt_boundary_length(groups[k], gamma), "predicted_length": l_hat[k]} for k in keys]
  return {"mre": prompt_boundary_mre(groups, l_hat, gamma), "prompt_groups": len(keys), "groups": rows}


def least_mre_gamma(trajectories, horizons: int = 160) -> tuple[float, float]:
  """(gamma, training MRE) for model.gamma = "auto_mre": the gamma under which a LenVM that knows only the generator
  has the least prompt-boundary MRE on the training groups.

  Such a LenVM's V(s_0) is the generator's mean return, so its L_hat is the log-mean of gamma ** L: a certainty
  equivalent that lies further below the mean length as gamma falls. MRE rewards the 1/L-weighted median, which lies
  below the mean for right-skewed lengths, so the spec's p99 rule (made for per-token resolution) overshoots it.
  Searched over horizons 1 / (1 - gamma) from 2 tokens to 4x the longest completion, log-spaced.
  """
  groups = group_by_prompt(trajectories)
  if not groups:
    raise ValueError("model.gamma='auto_mre' needs finished completions in the training split; there are none")
  # Flat arrays so each candidate gamma costs a few numpy passes: lengths in group order, their group and generator.
  generators = sorted({generator for _, generator in groups})
  lengths = np.concatenate([np.asarray(v, np.float64) for v in groups.values()])
  sizes = np.array([len(v) for v in groups.values()])
  group_generator = np.array([generators.index(generator) for _, generator in groups])
  sample_generator = np.repeat(group_generator, sizes)

  def log_mean_exp(x, index, count):  # Per-bucket log(mean(exp(x))), stable for very negative x.
    top = np.full(count, -np.inf)
    np.maximum.at(top, index, x)
    return top + np.log(np.bincount(index, np.exp(x - top[index]), count) / np.bincount(index, minlength=count))

  best = None
  for horizon in np.geomspace(2.0, 4.0 * max(lengths.max(), 2.0), horizons):
    gamma = 1.0 - 1.0 / horizon
    log_terms = lengths * np.log(gamma)
    truth = log_mean_exp(log_terms, np.repeat(np.arange(len(sizes)), sizes), len(sizes)) / np.log(gamma)
    guess = log_mean_exp(log_terms, sample_generator, len(generators)) / np.log(gamma)
    mre = float(np.mean(np.abs(guess[group_generator] - truth) / np.maximum(truth, 1.0)))
    if best is None or mre < best[1]:
      best = (float(gamma), mre)
  return best


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
    generators.append(np.full(length + 1, _generator(t), dtype=object))
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
  by_generator = collections.defaultdict(list)
  for (_, generator), truth in truths.items():
    by_generator[generator].append(truth)
  return LengthBaselines(
      constant_remaining=float(np.median(remaining)), position_remaining=position,
      constant_prompt_length=least_mre_length(list(truths.values())),
      generator_prompt_length={g: least_mre_length(v) for g, v in by_generator.items()})


def evaluate(predictor, trajectories, baselines: LengthBaselines, gamma: float, max_len: int,
             batch_size: int = 16, max_prompt_len: int = 0) -> dict:
  """{"token_mae": {...}, "prompt_mre": {...}}, each {"model", "constant", "position" or "generator"} overall and
  per generator, on the finished held-out trajectories."""
  finished = [t for t in trajectories if t.finished]
  predictions = predictor.predict(finished, batch_size=batch_size, max_len=max_len, max_prompt_len=max_prompt_len)
  errors = collections.defaultdict(lambda: collections.defaultdict(list))
  for t, (_, n_hat) in zip(finished, predictions):
    steps = np.arange(len(n_hat))
    n = len(t.completion_ids) - steps
    for scope in (ALL_GENERATORS, _generator(t)):
      errors[scope]["model"].append(np.abs(n_hat - n))
      errors[scope]["constant"].append(np.abs(baselines.constant_remaining - n))
      errors[scope]["position"].append(np.abs(baselines.remaining_by_position(_generator(t), steps) - n))
  token_mae = {scope: {name: float(np.mean(np.concatenate(v))) for name, v in by.items()}
               for scope, by in errors.items()}

  groups = group_by_prompt(finished)
  # The same prompt gives the same V(s_0), so any member's first prediction is the group's L_hat.
  boundary = {_group_key(t): float(n_hat[0]) for t, (_, n_hat) in zip(finished, predictions)}
  guesses = {"model": boundary, "constant": lambda key: baselines.constant_prompt_length,
             "generator": lambda key: baselines.generator_prompt_length.get(key[1], baselines.constant_prompt_length)}
  by_name = {name: prompt_boundary_mre(groups, guess, gamma) for name, guess in guesses.items()}
  prompt_mre = {scope: {name: by_name[name][scope] for name in guesses} for scope in by_name["model"]}
  counts = {"trajectories": len(finished), "prompt_groups": len(groups),
            "tokens": int(sum(len(p[1]) for p in predictions))}
  return {"token_mae": token_mae, "prompt_mre": prompt_mre, "counts": counts}
