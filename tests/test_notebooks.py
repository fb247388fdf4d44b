"""Every notebook executes top to bottom at a small size (GRAMFLOW_NOTEBOOK_SIZE=small)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib", reason="notebooks need the examples extra")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("GRAMFLOW_NOTEBOOK_SIZE", "small")
    nb = json.loads(path.read_text())
    namespace = {"__name__": "__main__"}
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells, f"{path.name} has no code"
    for i, cell in enumerate(code_cells):
        assert not cell.get("outputs"), f"{path.name}: commit notebooks with outputs stripped"
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
    plt.close("all")


def test_there_are_notebooks():
    assert NOTEBOOKS
