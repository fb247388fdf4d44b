"""User data from disk (`load_data`) and the command line's `--data` / `--batch-size`."""

import json

import jax
import numpy as np
import pytest

import gramflow as gf
from gramflow.cli.main import main


def _arrays(P=12, d=3, k=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(P, d))
    y = rng.normal(size=(P,) if k is None else (P, k))
    return X, y


def test_load_npz_and_directory(tmp_path):
    X, y = _arrays(k=2)
    Xt, yt = _arrays(P=5, k=2, seed=1)
    np.savez(tmp_path / "data.npz", X=X, y=y, X_test=Xt, y_test=yt)
    a, b = gf.load_data(tmp_path / "data.npz")
    np.testing.assert_array_equal(a, X)
    np.testing.assert_array_equal(b, y)
    a, b = gf.load_data(tmp_path / "data.npz", split="test")
    np.testing.assert_array_equal(a, Xt)
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "X.npy", X.astype(np.float32))
    np.save(folder / "y.npy", y.astype(np.float32))
    a, b = gf.load_data(folder)
    assert isinstance(a, np.memmap) and a.dtype == np.float32  # nothing read yet
    np.testing.assert_array_equal(a, X.astype(np.float32))
    a, _ = gf.load_data(folder, dtype="float64")
    assert a.dtype == np.float64 and not isinstance(a, np.memmap)


def test_load_errors(tmp_path):
    X, y = _arrays()
    np.savez(tmp_path / "noy.npz", X=X)
    with pytest.raises(KeyError, match="not \\['y'\\]"):
        gf.load_data(tmp_path / "noy.npz")
    with pytest.raises(FileNotFoundError, match="X.npy"):
        gf.load_data(tmp_path)
    np.savez(tmp_path / "bad.npz", X=X, y=y[:5])
    with pytest.raises(ValueError, match="same P"):
        gf.load_data(tmp_path / "bad.npz")
    np.savez(tmp_path / "ints.npz", X=X, y=np.arange(12))
    with pytest.raises(TypeError, match="floating-point"):
        gf.load_data(tmp_path / "ints.npz")
    with pytest.raises(ValueError, match=".npz file or a directory"):
        gf.load_data(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        gf.load_data(tmp_path / "bad.npz", split="val")


def test_cli_simulate_on_a_file_with_minibatches(tmp_path, capsys):
    """`gramflow simulate --data FILE --batch-size B` runs SGD on the file's rows, with the
    batches of `gf.batch_key(seed)`: the same run as the API's."""
    X, y = _arrays(P=16, d=4)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out = tmp_path / "sim"
    assert main(["simulate", "--data", str(tmp_path / "d.npz"), "--samples", "14", "--depth",
                 "2", "--width", "6", "--steps", "12", "--batch-size", "4", "--lr", "0.05",
                 "--record-every", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["closure_error_max"] < 1e-10  # collective SGD beside weights SGD
    with np.load(out / "results.npz") as data:
        r, noise = data["r"], data["gradient_noise"]
    assert r.shape == (4, 14) and noise.shape == (4, 2)
    assert summary["dims"]["gradient_noise"] == ["record", "statistic"]
    net = gf.ReLUNet.init(jax.random.key(1), 4, (6, 6), dtype=X.dtype)
    ref = gf.simulate(net, X[:14], y[:14], steps=12, lr=0.05, batch_size=4, key=gf.batch_key(0),
                      record_every=4)
    np.testing.assert_allclose(r, ref.r, rtol=0, atol=1e-12)
    assert main(["simulate", "--data", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_sweep_over_batch_sizes(tmp_path):
    """`gramflow sweep --batch-sizes 4 full` on a file: a batch-size axis in every array and
    its name in the dims; the entries equal the API's sweep."""
    X, y = _arrays(P=12, d=3)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out = tmp_path / "sw"
    assert main(["sweep", "--data", str(tmp_path / "d.npz"), "--depths", "1", "--widths", "4",
                 "--seeds", "0", "--lrs", "0.05", "--steps", "6", "--record-every", "3",
                 "--batch-sizes", "4", "full", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["dims"]["loss"] == ["depth", "width", "seed", "lr", "batch_size", "record"]
    assert summary["final_loss_dims"] == ["depth", "width", "lr", "batch_size"]
    ref = gf.sweep(X, y, widths=[4], depths=[1], seeds=[0], lrs=[0.05], steps=6,
                   record_every=3, batch_sizes=[4, None], progress=False)
    with np.load(out / "results.npz") as data:
        np.testing.assert_allclose(data["loss"], ref.loss, rtol=1e-12)
    config = tmp_path / "s.toml"
    config.write_text(f'data = "{tmp_path / "d.npz"}"\ndepths = 1\nwidths = 4\nseeds = 0\n'
                      f'lrs = 0.05\nsteps = 2\nbatch_sizes = [4, "full"]\n'
                      f'out = "{tmp_path / "toml"}"\n')
    assert main(["sweep", "--config", str(config)]) == 0
    config.write_text('batch_sizes = [0]\n')
    assert main(["sweep", "--config", str(config)]) == 2
