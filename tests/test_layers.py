"""The layer rules of docs/ARCHITECTURE.md, declared as import-linter
contracts in pyproject.toml ([tool.importlinter]): reference/schedule ->
ops -> triton/nn/diffusion -> train -> bench -> cli, imports only downward (so
no cycles between layers), and the benchmark suites never import each other."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    r = subprocess.run([sys.executable, "-c", code, "--config", os.path.join(ROOT, "pyproject.toml")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
