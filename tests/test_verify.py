"""The verification layer passes on correct code and catches wrong code."""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import problem

import gramflow as gf
import gramflow.fields.verify as verify_module


# Depths 1 and 4 (depth 2: the tests below, float64; depth 3 in float32: the command line's
# default network in test_cli_verify_prints_table_and_exits_zero).
@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("out_dim", [None, 2])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_verify_ok(getkey, depth, out_dim, dtype):
    net, X, y = problem(getkey(), depth, out_dim=out_dim, dtype=dtype)
    # One compiled program per case (eagerly every small operation compiles on its own; eager
    # verify: the tests below and the command line, float64 and float32).
    report = jax.jit(gf.verify)(net, X, y)
    assert isinstance(report, gf.VerificationReport)
    assert len(report.gradients) == len(report.K) == len(report.B) == depth
    assert report.ok(), str(report)
    assert report.max_error < (1e-13 if dtype == jnp.float64 else 1e-5)


def _scaled(fn, factor):
    def wrong(*args):
        out = fn(*args)
        return jax.tree.map(lambda x: x * factor, out)

    return wrong


@pytest.mark.parametrize(
    "target,field",
    [
        ("pullback_gradients", "gradients"),
        ("parameter_gradients", "gradients"),
        ("collective_kernel", "kernel"),
        ("collective_state", "Delta"),
    ],
)
def test_verify_catches_wrong_implementation(getkey, monkeypatch, target, field):
    net, X, y = problem(getkey(), 2)
    factor = 1 + 1e-8  # a tiny error is still far above the float64 tolerance
    monkeypatch.setattr(verify_module, target, _scaled(getattr(verify_module, target), factor))
    report = gf.verify(net, X, y)
    assert not report.ok()
    errors = getattr(report, field)
    assert max(float(e) for e in (errors if isinstance(errors, tuple) else (errors,))) > 1e-9
    assert "FAILED" in str(report)


def test_verify_catches_wrong_layer_kernel(getkey, monkeypatch):
    net, X, y = problem(getkey(), 3)
    real = verify_module.layer_kernels

    def wrong(net, X):
        lk = real(net, X)
        return gf.LayerKernels(G=lk.G, Q=lk.Q, K=(lk.K[0], lk.K[1] * 1.001, lk.K[2]), total=lk.total)

    monkeypatch.setattr(verify_module, "layer_kernels", wrong)
    report = gf.verify(net, X, y)
    assert float(report.K[1]) > 1e-4 and float(report.K[0]) < 1e-13 and not report.ok()


def test_report_ok_rtol_and_table(getkey):
    net, X, y = problem(getkey(), 2, out_dim=2)
    report = gf.verify(net, X, y)
    assert report.ok(rtol=1e-10)
    # ok(rtol) is exactly `max_error <= rtol`: it fails just below the largest error and
    # passes at it (the former `not ok(0.0) or max_error == 0.0` could not fail).
    m = report.max_error
    assert m == max(float(jnp.max(e)) for e in jax.tree.leaves(report))  # every error leaf
    assert not report.ok(rtol=float(np.nextafter(m, -np.inf)))
    assert report.ok(rtol=m)
    text = str(report)
    for name in ["gradients", "kernel", "residual_velocity", "Delta", "layer 1", "layer 2", "ok at rtol 1e-10"]:
        assert name in text


@pytest.mark.parametrize("field", ["H", "kernel", "residual_velocity"])
def test_report_nan_error_fails(getkey, field):
    """`ok` documents that NaN errors fail, wherever the NaN sits in the report."""
    net, X, y = problem(getkey(), 2)
    report = gf.verify(net, X, y)
    nan = jnp.asarray(jnp.nan, report.kernel.dtype)
    if field == "H":
        broken = eqx.tree_at(lambda r: r.H, report, (nan, *report.H[1:]))
    else:
        broken = eqx.tree_at(lambda r: getattr(r, field), report, nan)
    assert np.isnan(broken.max_error)
    assert not broken.ok(rtol=1.0) and "FAILED" in str(broken)


def test_cli_verify_prints_table_and_exits_zero(capsys):
    from gramflow.cli.main import main

    assert main(["verify", "--samples", "12", "--out-dim", "2", "--widths", "5", "3"]) == 0
    out = capsys.readouterr().out
    assert "gramflow verification (float64" in out and ": ok at rtol 1e-10" in out
    # A fresh process without x64: the float32 path as a user without x64 would run it.
    proc = subprocess.run(
        [sys.executable, "-m", "gramflow", "verify", "--samples", "12", "--dtype", "float32",
         "--widths", "5", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(float32" in proc.stdout and ": ok at rtol 0.0001" in proc.stdout


def test_cli_bad_configuration_exits_two():
    proc = subprocess.run(
        [sys.executable, "-m", "gramflow", "verify", "--widths", "4", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "`widths[1]` must be a positive int" in proc.stderr
