"""The command line: the demo at a tiny size, simulate and sweep from flags and TOML."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import gramflow as gf
from gramflow.cli import demo
from gramflow.cli.main import main


@pytest.mark.slow
def test_demo_tiny_writes_figures_and_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    assert main(["demo", "--size", "tiny", "--out", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert str(tmp_path) in text and "summary" in text
    pngs = sorted(tmp_path.glob("*.png"))
    names = {p.name for p in pngs}
    for data in ("teacher", "digits"):
        for fig in ("loss_curves", "kernel_shares", "spectrum", "kernel_drift_vs_width",
                    "closure_error_vs_depth"):
            assert f"{data}_{fig}.png" in names
    assert "limit_distance_vs_width.png" in names
    assert all(p.stat().st_size > 5000 for p in pngs)
    meta = json.loads((tmp_path / "results.json").read_text())
    # The distance of K₀ from the infinite-width limit falls with width, about as N^{-1/2}.
    for data in ("teacher", "digits"):
        assert -0.75 < meta["limit"][data]["slope_total"] < -0.25
    rows = meta["summary"]
    assert {r["dataset"] for r in rows} == {"teacher", "digits"}
    for r in rows:
        assert r["collective_vs_weights"] < 1e-10  # the exact engine is exact
        if r["depth"] == 1:
            assert r["layer_local"] < 1e-10 and r["frozen_kernel"] > 1e-6
        else:
            assert r["layer_local"] > 1e-6
    with np.load(tmp_path / "results.npz") as data:
        assert data["teacher_loss"].ndim == 5 and data["digits_closure_error"].ndim == 5
        distance = data["digits_limit_distance"]  # (width, seed, layer + total)
        assert distance.shape == (3, 4, 3)
        assert (np.diff(distance.mean(axis=1), axis=0) < 0).all()


def test_demo_without_scikit_learn_runs_the_synthetic_task(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    # Which datasets run is what is tested here (the tiny demo itself, above): a smaller grid,
    # one depth, so fewer programs to compile.
    monkeypatch.setitem(demo.SIZES, "tiny", {
        "teacher": 12, "digits": 12, "widths": (4,), "depths": (1,), "steps": 4, "seeds": (0,),
        "limit_widths": (4, 16), "limit_seeds": 1})
    assert main(["demo", "--size", "tiny", "--data", "digits", "--out", str(tmp_path),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "need scikit-learn" in text and "pip install" in text
    meta = json.loads((tmp_path / "results.json").read_text())
    assert set(meta["datasets"]) == {"teacher"}


def test_simulate_from_flags_and_toml(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--depth", "2", "--width", "8", "--samples", "12", "--steps", "20",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["closure_error_max"] < 1e-10 and summary["loss_end"] < summary["loss_start"]
    # Every results file says what produced it and names the axes of every array.
    assert summary["versions"]["gramflow"] == gf.__version__ and summary["dtype"] == "float64"
    assert summary["versions"]["jax"] == jax.__version__
    with np.load(out / "results.npz") as data:
        assert set(data.files) == set(summary["dims"])
        for name in data.files:
            assert len(summary["dims"][name]) == data[name].ndim, name
    assert summary["dims"]["r"] == ["record", "sample"]
    config = tmp_path / "run.toml"
    config.write_text('depth = 1\nwidth = 6\nsamples = 10\nsteps = 10\nengine = "weights"\n'
                      f'reference = "none"\nout = "{tmp_path / "toml"}"\n')
    assert main(["simulate", "--config", str(config), "--steps", "12"]) == 0  # flag wins
    summary = json.loads((tmp_path / "toml" / "results.json").read_text())
    assert summary["config"]["steps"] == 12 and summary["config"]["width"] == 6
    bad = tmp_path / "bad.toml"
    bad.write_text("depht = 2\n")
    assert main(["simulate", "--config", str(bad)]) == 2
    assert "unknown key(s) ['depht']" in capsys.readouterr().err


def test_sweep_from_flags(tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", "--depths", "1", "2", "--widths", "4", "8", "--seeds", "0", "--lrs",
                 "0.05", "--steps", "10", "--samples", "10", "--out", str(out)]) == 0
    meta = json.loads((out / "results.json").read_text())
    with np.load(out / "results.npz") as data:
        assert data["loss"].shape[:4] == (2, 2, 1, 1)
        assert set(data.files) == set(meta["dims"])
        for name in data.files:
            assert len(meta["dims"][name]) == data[name].ndim, name
    assert meta["versions"]["gramflow"] == gf.__version__ and meta["dtype"] == "float64"
    assert list((out / "chunks").glob("*.json"))


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "gramflow", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for word in ("demo", "verify", "simulate", "sweep"):
        assert word in proc.stdout


def test_structured_networks_from_the_command_line(tmp_path, capsys):
    assert main(["verify", "--structure", "both", "--widths", "8", "8", "--samples", "8"]) == 0
    assert "both" in capsys.readouterr().out
    out = tmp_path / "sim"
    assert main(["simulate", "--structure", "corrected", "--depth", "2", "--width", "8",
                 "--samples", "12", "--steps", "15", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["closure_error_max"] < 1e-10 and summary["loss_end"] < summary["loss_start"]
    # Every results file says what produced it and names the axes of every array.
    assert summary["versions"]["gramflow"] == gf.__version__ and summary["dtype"] == "float64"
    assert summary["versions"]["jax"] == jax.__version__
    with np.load(out / "results.npz") as data:
        assert set(data.files) == set(summary["dims"])
        for name in data.files:
            assert len(summary["dims"][name]) == data[name].ndim, name
    assert summary["dims"]["r"] == ["record", "sample"]
    assert main(["sweep", "--structure", "pathways", "--depths", "2", "--widths", "8",
                 "--seeds", "0", "--lrs", "0.05", "--steps", "5", "--samples", "10",
                 "--out", str(tmp_path / "sw")]) == 0


def test_version(capsys):
    import gramflow as gf

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"gramflow {gf.__version__}\n"


def test_config_takes_one_value_for_a_list_and_names_the_file_on_errors(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'widths = 4\ndepths = 1\nseeds = 0\nlrs = 1\nsteps = 3\nsamples = 8\n'
                      f'out = "{tmp_path / "sw"}"\n')
    assert main(["sweep", "--config", str(config)]) == 0
    with np.load(tmp_path / "sw" / "results.npz") as data:
        assert data["loss"].shape[:4] == (1, 1, 1, 1)
    capsys.readouterr()
    cases = {
        "steps = 3\nwidths 4\nseeds = 0\n": f"cannot read config {tmp_path / 'bad.toml'}: "
                                           ".*line 2, column 8",
        "steps = 3\nwidths = 4\nwidths = 8\n": r"cannot read config .*bad.toml: .*line 3",
        'widths = "64"\n': r"`widths` in .*bad.toml must be an int or a list of them, got '64'",
        "seeds = [0, 1.5]\n": r"`seeds` in .*bad.toml must be an int",
        "lrs = []\n": r"`lrs` in .*bad.toml is an empty list",
        "depths = true\n": r"`depths` in .*bad.toml must be an int",
        "steps = [3]\n": r"`steps` in .*bad.toml takes one value, got the list \[3\]; write e.g. "
                         r"`steps = 3`",
        'observables = ["loss", "bogus"]\n': r"`observables` in .*bad.toml is 'bogus'; choose "
                                             r"from \['loss', 'r', 'kernel_trace'",
    }
    bad = tmp_path / "bad.toml"
    for text, message in cases.items():
        bad.write_text(text)
        assert main(["sweep", "--config", str(bad)]) == 2, text
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, (text, err)
    bad.write_text("width = [8]\n")
    assert main(["simulate", "--config", str(bad)]) == 2
    assert "`width` in" in capsys.readouterr().err


def test_float32_and_observables_from_the_command_line(tmp_path, capsys, monkeypatch):
    import jax

    updates = []
    real = jax.config.update
    monkeypatch.setattr(jax.config, "update",
                        lambda name, value: updates.append((name, value)) or real(name, value))
    out = tmp_path / "sim"
    assert main(["simulate", "--dtype", "float32", "--depth", "1", "--width", "8", "--samples",
                 "12", "--steps", "5", "--record-every", "1", "--observables", "kernel_trace",
                 "alignment", "--out", str(out)]) == 0
    with np.load(out / "results.npz") as data:
        assert {"loss", "kernel_trace", "alignment"} <= set(data.files)
        assert data["loss"].dtype == data["kernel_trace"].dtype == np.float32
        assert data["loss"].shape == (6,) and np.isfinite(data["alignment"]).all()
    assert json.loads((out / "results.json").read_text())["config"]["dtype"] == "float32"
    out = tmp_path / "sw"
    assert main(["sweep", "--dtype", "float32", "--depths", "1", "--widths", "4", "8",
                 "--seeds", "0", "--lrs", "0.05", "--steps", "4", "--samples", "10",
                 "--observables", "kernel_eigs", "--out", str(out)]) == 0
    with np.load(out / "results.npz") as data:
        assert data["loss"].dtype == np.float32 and data["kernel_eigs"].shape[:4] == (1, 2, 1, 1)
    assert ("jax_enable_x64", True) not in updates  # float32 leaves the precision alone
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "--observables", "loss", "bogus"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "'kernel_trace'" in err
