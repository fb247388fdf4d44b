"""The architecture holds: imports flow one way (the import-linter contract in pyproject.toml),
and no function branches on plain vs structured networks."""

import pathlib
import subprocess
import sys

import gramflow as gf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_layers_contract():
    exe = pathlib.Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_function_local_imports_in_the_library():
    """A function-local import is how an import circle hides; only the command line (which
    imports lazily to start fast) may have them."""
    offenders = []
    for path in (ROOT / "gramflow").rglob("*.py"):
        if path.relative_to(ROOT) == pathlib.Path("gramflow/cli/main.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith((" ", "\t")) and line.strip().startswith("from ."):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_no_plain_or_structured_branch():
    root = pathlib.Path(gf.__file__).parent
    hits = [str(p) for p in root.rglob("*.py") if ".structured" in p.read_text()]
    assert hits == []
