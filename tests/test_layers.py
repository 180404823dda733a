"""The library's layers look only down (WORKSPACE.md): config -> data -> model -> value -> train | decoding | evaluation.

Parsed from the source (every import statement, also those inside functions), so a new upward import fails here
before it tangles the packages: the library never imports experiments/ or launch/, decoding and evaluation never
import train/, and the layers below value never import the ones above them.
"""

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "lenvm_jax"
# Rank of each top-level module or package of lenvm_jax: a module may import its own package and lower ranks.
RANKS = {"errors": 0, "files": 1, "sharding": 0, "distributed": 0, "sweep_spec": 0, "model.config": 1, "config": 2,
         "data": 3, "model": 4, "value": 5, "rundir": 5, "train": 6, "decoding": 6, "evaluation": 6}
# Top-layer siblings that may use each other: evaluation scores what decoding produces. Nothing may import train.
SIBLINGS = {("evaluation", "decoding")}


def _unit_of(parts) -> str:
  """The most specific RANKS key naming a module path (model/config.py is "model.config", the model section of the
  run config, stdlib only; the rest of model/ is "model")."""
  dotted = ".".join(p.removesuffix(".py") for p in parts[:2])
  return dotted if dotted in RANKS else parts[0].removesuffix(".py")


def _unit(path: pathlib.Path) -> str:
  return _unit_of(path.relative_to(LIBRARY).parts)


def _imported_units(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{alias.name}" for alias in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] in ("experiments", "launch"):
        yield parts[0], node.lineno
      elif parts[0] == "lenvm_jax" and len(parts) > 1:
        yield _unit_of(parts[1:]), node.lineno


def test_every_library_module_has_a_layer():
  units = {_unit(p) for p in LIBRARY.rglob("*.py")} - {"__init__"}
  assert units <= set(RANKS), f"give these a rank in RANKS: {sorted(units - set(RANKS))}"


def test_imports_only_look_down():
  upward = []
  for path in sorted(LIBRARY.rglob("*.py")):
    unit = _unit(path)
    if unit == "__init__":
      continue
    for target, line in _imported_units(path):
      allowed = target.split(".")[0] == unit.split(".")[0] or (target in RANKS and target != "train" and
                                   (RANKS[target] < RANKS[unit] or (unit, target) in SIBLINGS))
      if not allowed:
        upward.append(f"{path.relative_to(LIBRARY.parent)}:{line} imports {target}")
  assert not upward, "\n".join(upward)
