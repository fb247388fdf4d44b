"""The documentation: the site builds without warnings, the API reference lists every public
name, the examples in the docs run, and nothing in the repository points to a file that is
not in it."""

import pathlib
import re
import subprocess
import sys
import types

import pytest

import gramflow as gf
import gramflow.diagnostics as dg

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_mkdocs_build_strict(tmp_path):
    exe = pathlib.Path(sys.executable).parent / "mkdocs"
    out = subprocess.run([str(exe), "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(exe.parent),
                              "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "fields" / "index.html").read_text()
    assert "pullback recursion" in api  # docstrings were rendered, not just headings


def _documented():
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    return set(re.findall(r"^::: (gramflow(?:\.diagnostics)?\.\w+)$", text, re.M))


def test_api_reference_lists_every_public_name():
    public = {f"gramflow.{n}" for n in dir(gf)
              if not n.startswith("_") and not isinstance(getattr(gf, n), types.ModuleType)}
    public |= {f"gramflow.diagnostics.{n}" for n in dir(dg) if not n.startswith("_")}
    documented = _documented()
    assert public - documented == set(), "add these to docs/api/*.md"
    assert documented - public == set(), "docs/api/*.md documents names that do not exist"


def _python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


PAGES = sorted(p for p in DOCS.rglob("*.md") if _python_blocks(p))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_examples_in_the_docs_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in _python_blocks(page):
        exec(compile(block, str(page), "exec"), {"__name__": "__docs__"})  # noqa: S102


TEXT = (".md", ".py", ".toml", ".yml", ".yaml", ".ipynb", ".cfg", ".txt", ".sh")
# File names that stand for the user's own files in examples, not files of this repository.
USER_FILES = {"run.toml"}


def _repository_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.split()]


def test_no_references_to_files_outside_the_repository():
    files = _repository_files()
    names = {f.name for f in files}
    pattern = re.compile(r"(?<![\w/.-])((?:\.\./|\./)?[\w./-]*\w\.(?:md|py|ipynb|toml|yml|sh))\b")
    missing = []
    for path in files:
        if path.suffix not in TEXT or not path.exists() or path.is_symlink():
            continue
        if path.relative_to(ROOT).parts[0] == "tests":  # tests name their own temporary files
            continue
        for i, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            for ref in pattern.findall(line):
                if ref.startswith(("http", "www.")) or "://" in line.split(ref)[0][-12:]:
                    continue
                candidates = [ROOT / ref, path.parent / ref, DOCS / ref]  # mkdocs nav: docs/
                exists = any(c.exists() for c in candidates)
                if not exists and "/" not in ref and (ref in names or ref in USER_FILES):
                    exists = True
                if not exists:
                    missing.append(f"{path.relative_to(ROOT)}:{i}: {ref}")
    assert missing == []
