"""The kernel without forming it: kernel_matvec, kernel_eigs, and the tiled collective_kernel,
against the dense kernel in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close, jacobian_kernels, problem, rel_err

import gramflow as gf


def _flat(K):
    if K.ndim == 2:
        return K
    P, k = K.shape[0], K.shape[2]
    return K.transpose(0, 2, 1, 3).reshape(P * k, P * k)


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_kernel_matvec_equals_dense(getkey, depth, out_dim):
    net, X, _ = problem(getkey(), depth, out_dim=out_dim, P=30)
    K = _flat(sum(jacobian_kernels(net, X)))  # independent: J Jᵀ by jax.jacrev
    shape = (30,) if out_dim is None else (30, out_dim)
    v = jax.random.normal(getkey(), shape)
    assert_rel_close(gf.kernel_matvec(net, X, v).reshape(-1), K @ v.reshape(-1), jnp.float64)
    V = jax.random.normal(getkey(), (*shape, 4))
    KV = gf.kernel_matvec(net, X, V)
    assert KV.shape == V.shape
    assert_rel_close(KV.reshape(-1, 4), K @ V.reshape(-1, 4), jnp.float64)
    with pytest.raises(ValueError, match="`v` must have shape"):
        gf.kernel_matvec(net, X, jnp.ones((29,)))


@pytest.mark.parametrize("out_dim", [None, 2])
def test_kernel_eigs_equals_dense(getkey, out_dim):
    net, X, _ = problem(getkey(), 2, out_dim=out_dim, P=300)
    K = _flat(gf.collective_kernel(net, X))
    values, vectors = np.linalg.eigh(np.asarray(K))
    top = gf.kernel_eigs(net, X, k=4, iters=12)
    assert int(top.iterations) == 12  # the Krylov path, not the dense fallback
    assert rel_err(top.values, values[::-1][:4]) <= 1e-10
    U = np.asarray(top.vectors).reshape(K.shape[0], 4)
    overlaps = np.abs(np.sum(U * vectors[:, ::-1][:, :4], axis=0))
    assert np.all(overlaps > 1 - 1e-8), overlaps
    assert float(top.residuals.max()) < 1e-6


def test_kernel_eigs_dense_fallback_and_errors(getkey):
    net, X, _ = problem(getkey(), 2, P=8)
    top = gf.kernel_eigs(net, X, k=3)
    ev = np.linalg.eigvalsh(np.asarray(gf.collective_kernel(net, X)))[::-1][:3]
    assert rel_err(top.values, ev) <= 1e-12 and int(top.iterations) == 0
    with pytest.raises(ValueError, match="`k` = 9 exceeds"):
        gf.kernel_eigs(net, X, k=9)
    with pytest.raises(ValueError, match="`k` must be a positive int"):
        gf.kernel_eigs(net, X, k=0)
    with pytest.raises(ValueError, match="`iters` must be a positive int"):
        gf.kernel_eigs(net, X, k=2, iters=0)


@pytest.mark.parametrize("block_size", [1, 5, 8, 64])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_tiled_kernel_equals_dense(getkey, block_size, out_dim):
    net, X, _ = problem(getkey(), 3, out_dim=out_dim, P=13)
    dense = gf.collective_kernel(net, X)
    tiled = gf.collective_kernel(net, X, block_size=block_size)
    assert tiled.shape == dense.shape
    assert_rel_close(tiled, dense, jnp.float64, what="tiled K")
    with pytest.raises(ValueError, match="`block_size` must be a positive int"):
        gf.collective_kernel(net, X, block_size=0)


@pytest.mark.parametrize("out_dim", [None, 2])
def test_block_triangular_kernel_equals_jacobian(getkey, monkeypatch, out_dim):
    """Large P computes one block triangle of each Gram product; a cost model with small
    blocks and no width threshold forces it here."""
    import gramflow.fields.kernels as kernels_module

    calls = []  # spy (not replace) the triangular form, to know it ran
    real = kernels_module._symmetric_kernel
    monkeypatch.setattr(kernels_module, "_symmetric_kernel",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cost = gf.CostModel(triangle_block=4, triangle_min_width=0)
    net, X, _ = problem(getkey(), 3, out_dim=out_dim, P=13)
    assert_rel_close(gf.collective_kernel(net, X, cost=cost), sum(jacobian_kernels(net, X)),
                     jnp.float64)
    assert calls == [1]
    gf.collective_kernel(net, X)  # the default cost model keeps the full form at this size
    assert calls == [1]
