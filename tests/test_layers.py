"""The library's layers look only down (WORKSPACE.md): config -> data -> model -> value -> train | decoding | evaluation.

Parsed from the source (every import statement, also those inside functions), so a new upward import fails here
before it tangles the packages: the library never imports experiments/ or launch/, decoding and evaluation never
import train/, and the layers below value never import the ones above them.
"""

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "lenvm_jax"
# Rank of each top-level module or package of lenvm_jax (one per package): a module may import its own package and
# lower ranks.
RANKS = {"errors": 0, "sharding": 0, "distributed": 0, "sweep_spec": 0, "gguf_file": 0, "files": 1, "model_config": 1,
         "config": 2, "data": 3, "model": 4, "value": 5, "run": 5, "train": 6, "decoding": 6, "evaluation": 6,
         "serving": 7, "progress": 0}
# Top-layer siblings that may use each other: evaluation scores what decoding produces. Nothing may import train.
SIBLINGS = {("evaluation", "decoding")}


def _unit_of(parts) -> str:
  """The RANKS key of a module path: its top-level package or module."""
  return parts[0].removesuffix(".py")


def _unit(path: pathlib.Path) -> str:
  return _unit_of(path.relative_to(LIBRARY).parts)


def _imported_names(path: pathlib.Path):
  """(dotted name, line) of every import statement, also those inside functions: `from a.b import c` gives both
  a.b and a.b.c (a module or a name in it)."""
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      yield from ((alias.name, node.lineno) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module, node.lineno
      yield from ((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)


def _imported_units(path: pathlib.Path):
  for name, line in _imported_names(path):
    parts = name.split(".")
    if parts[0] in ("experiments", "launch"):
      yield parts[0], line
    elif parts[0] == "lenvm_jax" and len(parts) > 1:
      yield _unit_of(parts[1:]), line


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


def _module_of(dotted: str):
  """The library file a dotted name imports (lenvm_jax.model.hf_import -> model/hf_import.py), or None."""
  parts = dotted.split(".")[1:]
  for end in range(len(parts), 0, -1):
    path = LIBRARY.joinpath(*parts[:end]).with_suffix(".py")
    if path.is_file():
      return path.relative_to(LIBRARY).as_posix()
  return None


def _module_imports(path: pathlib.Path) -> set[str]:
  found = {_module_of(name) for name, _ in _imported_names(path) if name.startswith("lenvm_jax.")}
  return found - {None, path.relative_to(LIBRARY).as_posix()}


def test_no_import_cycle_between_modules():
  """Inside a package too, two modules never import each other, directly or around a circle (lazy imports count):
  shared code moves below both instead (model/placement.py under hf_import and gguf_import)."""
  graph = {p.relative_to(LIBRARY).as_posix(): _module_imports(p) for p in LIBRARY.rglob("*.py")}
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(node):  # Tarjan's strongly connected components.
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in graph.get(node, ()):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  assert not circles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in circles)


def test_each_package_has_one_rank():
  assert all("." not in unit for unit in RANKS), "a rank per package, not per module inside one"


def test_no_test_module_imports_another_test_module():
  """Tests share code through tests/helpers.py (or conftest fixtures), never by importing a test module or conftest
  (pytest's own), so a test file can be read, moved or deleted alone."""
  tests_dir = pathlib.Path(__file__).resolve().parent
  bad = set()
  for path in sorted(tests_dir.glob("*.py")):
    for name, line in _imported_names(path):
      first = name.removeprefix("tests.").split(".")[0]
      if (name.startswith("tests.") or "." not in name) and (first == "conftest" or first.startswith("test_")):
        bad.add(f"{path.name}:{line} imports {name}")
  assert not bad, "\n".join(sorted(bad))
