"""What the launchers ship from this checkout: its root, config paths relative to it, its jax pin.

(Whether a workdir is a URL: lenvm_jax.run.workdir_checks.is_url, which imports no jax, as the launcher venv has none.)
"""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(path: str) -> str:
  """A trainer config as a path relative to the repo root (the code's root on the remote machine)."""
  absolute = os.path.abspath(os.path.join(REPO, path))  # Relative paths are taken from the repo root.
  if not os.path.isfile(absolute):
    raise ValueError(f"--config {path}: no such file under {REPO}")
  relative = os.path.relpath(absolute, REPO)
  if relative.startswith(".."):
    raise ValueError(f"--config {path}: must lie inside the repo ({REPO}); only the repo is shipped")
  return relative


def jax_version() -> str:
  """The exact jax pin of requirements.txt, so the accelerator build of jax installed remotely is the tested one."""
  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    match = re.search(r"^jax==(\S+)$", f.read(), re.M)
  if not match:
    raise ValueError("requirements.txt: no exact jax==<version> pin")
  return match.group(1)
