"""The spread of each metric over seeds, per variant of a sweep (experiments/reproduce.py): a comparison between
variants says only what these ranges support.

With a handful of seeds a standard deviation is itself a rough number, so the reports print the mean with the range
[min, max] of the seeds' values, and, per metric, which variants' ranges lie wholly apart from the best variant's
(separated by every seed run) and which overlap it (not separated by these seeds).
"""

import numpy as np


def spread(values) -> dict:
  """{"mean", "std", "min", "max", "seeds"} of one metric's values over seeds (std: population, 0 for one seed)."""
  values = np.asarray(values, np.float64)
  if not len(values):
    raise ValueError("no values to summarise")
  return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
          "max": float(values.max()), "seeds": len(values)}


def by_variant(rows: list[dict], label: str, metrics, history_keys=()) -> list[dict]:
  """One dict per value of rows[i][label] (first-seen order): for each metric present, its mean as <metric> and its
  spread as <metric>_std / _min / _max; "seeds" the runs of that variant; "history" the seed mean of history_keys at
  each step of the runs' "history" lists (steps of the first run)."""
  out = []
  for value in dict.fromkeys(r[label] for r in rows):
    runs = [r for r in rows if r[label] == value]
    merged = {label: value, "seeds": len(runs)}
    if history_keys:
      steps = [h["step"] for h in runs[0].get("history", [])]
      merged["history"] = [{"step": step, **{key: float(np.mean([r["history"][i][key] for r in runs
                                                                  if len(r["history"]) > i]))
                                             for key in history_keys}} for i, step in enumerate(steps)]
    for key in metrics:
      values = [r[key] for r in runs if key in r and np.isfinite(r[key])]
      if values:
        s = spread(values)
        merged[key] = s["mean"]
        merged.update({f"{key}_{name}": s[name] for name in ("std", "min", "max")})
    out.append(merged)
  return out


def format_cell(variant: dict, key: str) -> str:
  """A table cell: the mean, and [min, max] over the seeds when there are several."""
  if key not in variant:
    return ""
  if variant["seeds"] > 1:
    return f"{variant[key]:.4g} [{variant[key + '_min']:.4g}, {variant[key + '_max']:.4g}]"
  return f"{variant[key]:.4g}"


def separation(variants: list[dict], label: str, key: str) -> dict | None:
  """For a lower-is-better metric: the variant with the least mean, the variants whose [min, max] lies wholly above
  its range ("separated": every seed of the best beat every seed of theirs) and those whose range overlaps it
  ("overlapping": these seeds do not separate them). None when fewer than two variants have the metric."""
  have = [v for v in variants if key in v]
  if len(have) < 2:
    return None
  best = min(have, key=lambda v: v[key])
  rest = [v for v in have if v is not best]
  low = lambda v: v.get(key + "_min", v[key])
  high = lambda v: v.get(key + "_max", v[key])
  return {"best": best[label], "seeds": min(v["seeds"] for v in have),
          "separated": [v[label] for v in rest if low(v) > high(best)],
          "overlapping": [v[label] for v in rest if low(v) <= high(best)]}


def format_separation(variants: list[dict], label: str, metrics) -> str:
  """One line per (key, title) metric: which variant is best and which others its seeds' range separates."""
  lines = []
  for key, title in metrics:
    found = separation(variants, label, key)
    if found is None:
      continue
    if found["seeds"] < 2:
      verdict = "one seed: no spread to compare against"
    else:
      verdict = (f"apart from {', '.join(map(str, found['separated'])) or 'none'}; "
                 f"overlapping {', '.join(map(str, found['overlapping'])) or 'none'}")
    lines.append(f"  {title}: lowest mean {found['best']} ({verdict})")
  return "\n".join(lines)
