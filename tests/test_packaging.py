"""pyproject.toml: every third-party import of the library and its tools is a declared dependency, each pin is the
one the requirements files install, the console scripts name real tools, and pip can build the package's metadata."""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OWN = {"lenvm_jax", "experiments", "launch", "tests"}
REQUIREMENT_FILES = ("requirements.txt", "requirements-parity.txt", "requirements-tpu.txt")
# Parts of the library that only an extra's users import: their modules may import that extra at module level.
EXTRA_PARTS = {"lenvm_jax/serving/": "serve"}


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines) -> dict:
  """{canonical name (extras dropped): version} of `name[extras]==version` lines; comments skipped."""
  pins = {}
  for line in lines:
    line = line.split("#", 1)[0].strip()
    if line:
      match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
      assert match, f"not an exact pin: {line!r}"
      pins[_canonical(match.group(1))] = match.group(3)
  return pins


def _declared() -> tuple[dict, dict]:
  """(core pins, {extra: pins}) of pyproject.toml."""
  project = PYPROJECT["project"]
  return _pins(project["dependencies"]), {k: _pins(v) for k, v in project["optional-dependencies"].items()}


def _imports(root: pathlib.Path):
  """(top-level module name, file:line, inside a function) of every absolute import under root."""
  for path in sorted(root.rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    deferred = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for node in ast.walk(fn)}
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      for name in names:
        yield name.split(".")[0], f"{path.relative_to(REPO)}:{node.lineno}", id(node) in deferred


def test_every_third_party_import_is_declared():
  """A module-level import needs a core dependency (`pip install -e .` must import every module but those of
  EXTRA_PARTS, which need their extra); one inside a function (an optional source, a parity reference) may come from
  any extra."""
  core, extras = _declared()
  core, optional = set(core), set().union(*extras.values())
  distributions = importlib.metadata.packages_distributions()
  missing = []
  for root in ("lenvm_jax", "experiments"):
    for module, where, deferred in _imports(REPO / root):
      if module in sys.stdlib_module_names or module in OWN or module == "__future__":
        continue
      names = {_canonical(d) for d in distributions.get(module, [])}
      assert names, f"{where}: import {module}: no installed distribution provides it"
      part_extra = next((extras[e] for part, e in EXTRA_PARTS.items() if where.startswith(part)), {})
      if not names & (core | set(part_extra) | (optional if deferred else set())):
        missing.append(f"{where}: import {module} ({'/'.join(sorted(names))})")
  assert not missing, "declare these in pyproject.toml:\n" + "\n".join(missing)


def test_every_declared_pin_is_the_one_the_requirement_files_install():
  installed = {}
  for name in REQUIREMENT_FILES:
    installed.update(_pins((REPO / name).read_text().splitlines()))
  core, extras = _declared()
  differ = [f"{name}=={version} (requirements: {installed.get(name, 'absent')})"
            for pins in (core, *extras.values()) for name, version in pins.items() if installed.get(name) != version]
  assert not differ, differ
  assert {"research", "test", "tpu", "serve"} <= set(extras)
  assert {"reasoning-gym", "champ-dataset"} <= set(extras["research"]) and not {"reasoning-gym",
                                                                               "champ-dataset"} & set(core)


def test_console_scripts_name_tools_with_a_main():
  scripts = PYPROJECT["project"]["scripts"]
  assert {"lenvm-train", "lenvm-evaluate", "lenvm-predict", "lenvm-prepare-data", "lenvm-generate"} <= set(scripts)
  for script, target in scripts.items():
    assert target == "experiments.cli:console_main", script
    tool = REPO / "experiments" / (script.removeprefix("lenvm-").replace("-", "_") + ".py")
    assert re.search(r"^def main\(argv\):", tool.read_text(), re.M), f"{script}: {tool} has no main(argv)"


@pytest.mark.slow
def test_console_main_runs_the_tool_its_script_names_and_refuses_other_names():
  def run(name, *args):
    code = f"import sys; sys.argv = [{name!r}, *{list(args)!r}]; from experiments import cli; cli.console_main()"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)

  result = run("/usr/bin/lenvm-data-stats", "--help")  # absl prints the main module's flags (here: the tool's).
  assert "\n/usr/bin/lenvm-data-stats:\n" in result.stdout and "--packing: <first_fit|best_fit>" in result.stdout, (
      result.stdout[-2000:] + result.stderr[-2000:])
  result = run("lenvm-no-such-tool")
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      "error: lenvm-no-such-tool: no tool experiments/no_such_tool.py (the console scripts are named lenvm-<tool>)"]


@pytest.mark.slow
def test_pip_builds_the_editable_package():
  """`pip install -e .` up to the install itself: pyproject.toml parses, setuptools finds the packages, the metadata
  builds (no network: --no-build-isolation uses the test venv's setuptools, --no-deps skips the resolver)."""
  result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--dry-run",
                           "--disable-pip-version-check", "-e", str(REPO)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and "Would install lenvm-jax-0.1.0" in result.stdout, result.stderr[-3000:]
