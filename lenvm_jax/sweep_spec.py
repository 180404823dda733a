"""Sweep specs: `--sweep config.a.b=v1,v2` axes -> points (product or zip) -> trainer flags and workdir names.

The one parser for sweeps, shared by the local runner (experiments/sweep.py) and the XManager launcher
(launch/xm_launch.py). Standard library only: the launcher venv has no JAX. Values stay strings, exactly as they
would be typed after `--config.a.b=` on the trainer's command line, so ml_collections parses and type-checks them.
"""

import itertools
import re

_KEY = re.compile(r"^config(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+-]")


class SweepError(ValueError):
  pass


def _split_values(text: str) -> list[str]:
  """Splits on commas outside brackets, so tuple values like (0.05,0.3) stay whole."""
  values, depth, current = [], 0, ""
  for char in text:
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    if char == "," and depth == 0:
      values.append(current.strip())
      current = ""
    else:
      current += char
  values.append(current.strip())
  return values


def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
  """`config.loss.gamma=0.99,0.997` -> [("config.loss.gamma", ["0.99", "0.997"])], one axis per spec, in order."""
  axes: list[tuple[str, list[str]]] = []
  for spec in specs:
    key, sep, text = spec.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not _KEY.match(key):
      raise SweepError(f"--sweep {spec!r}: expected config.<field>=<value>[,<value>...], "
                       "e.g. config.loss.gamma=0.99,0.997")
    values = _split_values(text)
    if any(not v for v in values):
      raise SweepError(f"--sweep {spec!r}: empty value in the list")
    if len(set(values)) != len(values):
      raise SweepError(f"--sweep {spec!r}: repeated value")
    if key in (k for k, _ in axes):
      raise SweepError(f"--sweep {key} is given twice; list all its values in one --sweep")
    axes.append((key, values))
  return axes


def points(axes: list[tuple[str, list[str]]], zip_axes: bool = False) -> list[dict[str, str]]:
  """Every combination of the axes (product), or their i-th values together (zip: equal lengths required)."""
  if not axes:
    return [{}]
  keys = [k for k, _ in axes]
  lists = [v for _, v in axes]
  if zip_axes:
    lengths = {k: len(v) for k, v in axes}
    if len(set(lengths.values())) != 1:
      raise SweepError(f"--zip needs sweeps of equal length, got {lengths}")
    combos = zip(*lists)
  else:
    combos = itertools.product(*lists)
  return [dict(zip(keys, combo)) for combo in combos]


def trainer_flags(point: dict[str, str]) -> list[str]:
  """The point as the trainer's config overrides: ["--config.loss.gamma=0.99", ...]."""
  return [f"--{key}={value}" for key, value in point.items()]


def point_name(point: dict[str, str], axes: list[tuple[str, list[str]]]) -> str:
  """A readable, filesystem-safe, unique name: swept fields only (fixed single values add nothing), by their last
  path component unless two axes share it. Same spec -> same name, so a rerun finds its workdirs again."""
  varying = [k for k, values in axes if len(values) > 1] or [k for k, _ in axes]
  last = [k.rsplit(".", 1)[1] for k in varying]
  labels = {k: (short if last.count(short) == 1 else k[len("config."):]) for k, short in zip(varying, last)}
  name = ",".join(f"{labels[k]}={point[k]}" for k in varying)
  return _UNSAFE.sub("_", name) or "default"


def named_points(specs: list[str], zip_axes: bool = False) -> list[tuple[str, dict[str, str]]]:
  """Parses `--sweep` specs into (name, point) pairs, in sweep order; names are checked unique."""
  axes = parse_axes(specs)
  named = [(point_name(p, axes), p) for p in points(axes, zip_axes)]
  names = [n for n, _ in named]
  if len(set(names)) != len(names):
    raise SweepError(f"sweep values map to the same workdir name: {sorted(n for n in names if names.count(n) > 1)}")
  return named
