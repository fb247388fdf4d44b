"""Lazy-limit predictions: the frozen-kernel dynamics in closed form, on the training set and
at test sites, against the frozen-kernel engine, an explicit loop and a matrix exponential."""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import pytest

import gramflow as gf
from helpers import rel_err


def _setup(getkey, out_dim=None, widths=(16, 16), P=10, d=3):
    net = gf.ReLUNet.init(getkey(), d, widths, out_dim=out_dim, dtype=jnp.float64)
    X = jax.random.normal(getkey(), (P, d), jnp.float64)
    Xt = jax.random.normal(getkey(), (4, d), jnp.float64)
    y = jax.random.normal(getkey(), (P,) if out_dim is None else (P, out_dim), jnp.float64)
    return net, X, Xt, y


def _flat(K):
    return K if K.ndim == 2 else K.transpose(0, 2, 1, 3).reshape(K.shape[0] * K.shape[2], -1)


@pytest.mark.parametrize("out_dim", [None, 2])
def test_discrete_predictions_equal_the_frozen_kernel_engine_and_a_loop(getkey, out_dim):
    net, X, Xt, y = _setup(getkey, out_dim)
    K, Kt = gf.collective_kernel(net, X), gf.collective_kernel(net, Xt, X)
    lr = 1.0 / float(jnp.linalg.eigvalsh(_flat(K))[-1])
    n = 60
    lazy = gf.lazy_predictions(K, y, net(X), lr=lr, steps=jnp.arange(n + 1), K_test=Kt,
                               f0_test=net(Xt))
    run = gf.simulate(net, X, y, steps=n, lr=lr, engine=gf.FrozenKernel(), observables=("r",))
    assert rel_err(lazy.r, run.r) <= 1e-10
    assert rel_err(lazy.train, run.r + y[None]) <= 1e-10
    # The test sites move by −η K(X_test, X) r_n at every step.
    r, ft, Kf, Ktf = (net(X) - y).reshape(-1), net(Xt).reshape(-1), _flat(K), _flat(Kt)
    for step in range(n + 1):
        assert rel_err(lazy.test[step].reshape(-1), ft) <= 1e-10
        ft, r = ft - lr * Ktf @ r, r - lr * Kf @ r


def _flow_reference(K, Kt, r0, f0t, lr, t):
    """`r(t) = e^{−ηKt} r₀` and `f_test(t) = f0 − η K_t ∫₀ᵗ e^{−ηKs} ds r₀`, the integral as the
    top-right block of `exp([[−ηK, I], [0, 0]] t)` (valid for singular K)."""
    n = K.shape[0]
    A = jnp.block([[-lr * K, jnp.eye(n)], [jnp.zeros((n, n)), jnp.zeros((n, n))]])
    E = jsl.expm(A * t)
    return E[:n, :n] @ r0, f0t - lr * Kt @ (E[:n, n:] @ r0)


@pytest.mark.parametrize("out_dim", [None, 2])
def test_flow_predictions_equal_the_matrix_exponential(getkey, out_dim):
    net, X, Xt, y = _setup(getkey, out_dim)
    K, Kt = gf.collective_kernel(net, X), gf.collective_kernel(net, Xt, X)
    times = jnp.array([0.0, 0.3, 1.0, 4.0])
    lazy = gf.lazy_predictions(K, y, net(X), lr=0.7, t=times, K_test=Kt, f0_test=net(Xt))
    r0 = (net(X) - y).reshape(-1)
    for i, t in enumerate(times):
        r, ft = _flow_reference(_flat(K), _flat(Kt), r0, net(Xt).reshape(-1), 0.7, t)
        assert rel_err(lazy.r[i].reshape(-1), r) <= 1e-10
        assert rel_err(lazy.test[i].reshape(-1), ft) <= 1e-10
    # The engine's closed form agrees too.
    traj = gf.flow(net, X, y, t1=4.0, ts=times, lr=0.7, engine=gf.FrozenKernel(),
                   observables=("r",))
    assert rel_err(lazy.r, traj.r) <= 1e-10


def test_singular_kernel(getkey):
    """P = 12 samples, 2·3 = 6 trained weights: rank K ≤ 6. The null space does not move, and
    φ(0) = ηt, ηn keeps every prediction finite and exact."""
    net, X, Xt, y = _setup(getkey, widths=(3,), P=12, d=2)
    K, Kt = gf.collective_kernel(net, X), gf.collective_kernel(net, Xt, X)
    lam, U = jnp.linalg.eigh(K)
    assert int(jnp.sum(lam > 1e-10 * lam[-1])) <= 6
    r0 = net(X) - y
    lazy = gf.lazy_predictions(K, y, net(X), lr=0.5, t=jnp.array([0.5, 50.0]), K_test=Kt,
                               f0_test=net(Xt))
    assert bool(jnp.all(jnp.isfinite(lazy.test))) and bool(jnp.all(jnp.isfinite(lazy.r)))
    for i, t in enumerate([0.5, 50.0]):
        r, ft = _flow_reference(K, Kt, r0, net(Xt), 0.5, t)
        assert rel_err(lazy.r[i], r) <= 1e-10 and rel_err(lazy.test[i], ft) <= 1e-10
    null = U[:, lam <= 1e-10 * lam[-1]]
    assert rel_err(null.T @ lazy.r[-1], null.T @ r0) <= 1e-10  # the null space stays put
    # An exactly singular kernel (a zero eigenvalue) with discrete steps.
    K0 = jnp.diag(jnp.array([2.0, 1.0, 0.0]))
    out = gf.lazy_predictions(K0, jnp.zeros(3), jnp.ones(3), lr=0.25, steps=jnp.array([0, 3]),
                              K_test=jnp.ones((1, 3)))
    assert jnp.allclose(out.r[-1], jnp.array([0.125, 0.421875, 1.0]), rtol=1e-14)
    # the test site moves by −η Σ_{m<3} Σ_i r_{m,i}, with r_m = (0.5^m, 0.75^m, 1)
    expected = -0.25 * sum(float(jnp.sum(jnp.array([0.5, 0.75, 1.0]) ** m)) for m in range(3))
    assert abs(float(out.test[-1, 0]) - expected) <= 1e-14


def test_limit_kernel_predictions_and_errors(getkey):
    net, X, Xt, y = _setup(getkey)
    net = gf.ReLUNet.init(getkey(), 3, (16, 16), parametrization="ntk", dtype=jnp.float64)
    lim = gf.limit_kernels(net, X)
    out = gf.lazy_predictions(lim.total, y, lr=0.5, t=1e6,
                              K_test=gf.limit_kernels(net, Xt, X).total)
    assert rel_err(out.train[0], y) <= 1e-8  # interpolates: K∞ is positive definite here
    with pytest.raises(ValueError, match="exactly one"):
        gf.lazy_predictions(lim.total, y, lr=0.1)
    with pytest.raises(TypeError, match="integers"):
        gf.lazy_predictions(lim.total, y, lr=0.1, steps=jnp.array([1.5]))
    with pytest.raises(ValueError, match="K_test"):
        gf.lazy_predictions(lim.total, y, lr=0.1, t=1.0, K_test=jnp.ones((2, 5)))
