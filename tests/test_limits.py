"""Cross kernels between two sets of sites (I9) and the infinite-width limit of the layer
kernels (I11), against autodiff, an independent quadrature oracle and Monte Carlo."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gramflow as gf
from helpers import rel_err


def _jacobian_rows(net, X):
    """`∂f/∂θ` over the trained parameters, one row per (sample, output)."""
    params, rest = eqx.partition(net, gf.trainable(net))
    jac = jax.jacrev(lambda p: eqx.combine(p, rest)(X))(params)
    lead = X.shape[0] * (net.out_dim or 1)
    return [j.reshape(lead, -1) for j in jax.tree.leaves(jac)]


def _cross(J1, J2, P1, P2, k):
    K = J1 @ J2.T
    return K if k is None else K.reshape(P1, k, P2, k).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("out_dim", [None, 2])
@pytest.mark.parametrize("structured", [False, True])
def test_cross_kernels_equal_jacobian_products(getkey, out_dim, structured):
    kw = dict(masks=[None, gf.Mask.block_diagonal((6, 6), 2)], gains=1.2, skips=0.3,
              train=("weights", "gains", "skips")) if structured else {}
    net = gf.ReLUNet.init(getkey(), 4, (6, 6), out_dim=out_dim, dtype=jnp.float64, **kw)
    X1 = jax.random.normal(getkey(), (5, 4), jnp.float64)
    X2 = jax.random.normal(getkey(), (3, 4), jnp.float64)
    J1 = jnp.concatenate(_jacobian_rows(net, X1), axis=1)
    J2 = jnp.concatenate(_jacobian_rows(net, X2), axis=1)
    K_ref = _cross(J1, J2, 5, 3, out_dim)
    assert gf.collective_kernel(net, X1, X2).shape == K_ref.shape
    assert rel_err(gf.collective_kernel(net, X1, X2), K_ref) <= 1e-10
    assert rel_err(gf.collective_kernel(net, X1, X2, block_size=2), K_ref) <= 1e-10
    lk = gf.layer_kernels(net, X1, X2)
    assert rel_err(lk.total, K_ref) <= 1e-10
    # Per layer: the rows of the Jacobian of layer l's parameters (weights, gain, skip).
    for l in range(net.depth):
        def layer_rows(X):
            params, rest = eqx.partition(net, gf.trainable(net))
            jac = jax.jacrev(lambda p: eqx.combine(p, rest)(X))(params)
            lead = X.shape[0] * (out_dim or 1)
            rows = [jac.weights[l].reshape(lead, -1)]
            if structured:
                rows.append(jac.gains[..., l].reshape(lead, 1))
                if jac.skips[l] is not None:  # layer 1 (4 -> 6) has no skip path
                    rows.append(jac.skips[l].reshape(lead, 1))
            return jnp.concatenate(rows, axis=1)
        assert rel_err(lk.K[l], _cross(layer_rows(X1), layer_rows(X2), 5, 3, out_dim)) <= 1e-10


# -- the infinite-width limit -----------------------------------------------------------------

def _relu_moments(a, b, c, n=64):
    """E[relu(u) relu(v)] and P(u > 0, v > 0) for (u, v) ~ N(0, [[a, c], [c, b]]), by
    quadrature in polar coordinates: u = √a R cos φ, v = √b R cos(φ − β) with cos β = ρ.
    Both are positive on the arc φ ∈ (β − π/2, π/2), where the angular integrand is smooth
    (Gauss–Legendre); the radial integral ∫ R³ e^{−R²/2} dR is Gauss–Laguerre in t = R²/2."""
    rho = np.clip(c / np.sqrt(a * b), -1.0, 1.0)
    beta = np.arccos(rho)
    lo, hi = beta - np.pi / 2, np.pi / 2
    x, w = np.polynomial.legendre.leggauss(n)
    phi = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    angular = 0.5 * (hi - lo) * np.sum(w * np.cos(phi) * np.cos(phi - beta))
    t, wt = np.polynomial.laguerre.laggauss(8)
    radial = np.sum(wt * 2 * t)  # ∫_0^∞ R³ e^{−R²/2} dR with R dR = dt
    relu_relu = np.sqrt(a * b) * radial * angular / (2 * np.pi)
    both_positive = (hi - lo) / (2 * np.pi)
    return relu_relu, both_positive


def _oracle(X1, X2, L):
    """Σ_l, Ṡ_l by quadrature, entry by entry, in numpy."""
    X1, X2 = np.asarray(X1), np.asarray(X2)
    d = X1.shape[1]
    v1, v2, cov = (X1 * X1).sum(1) / d, (X2 * X2).sum(1) / d, X1 @ X2.T / d
    sigmas, dots = [], []
    for _ in range(L):
        sigmas.append(cov)
        nxt, dot = np.empty_like(cov), np.empty_like(cov)
        for i in range(cov.shape[0]):
            for j in range(cov.shape[1]):
                nxt[i, j], dot[i, j] = _relu_moments(v1[i], v2[j], cov[i, j])
        v1 = np.array([_relu_moments(v, v, v)[0] for v in v1])
        v2 = np.array([_relu_moments(v, v, v)[0] for v in v2])
        cov = nxt
        dots.append(dot)
    K = [s * np.prod(dots[l:], axis=0) for l, s in enumerate(sigmas)]
    return sigmas, K, cov


@pytest.mark.parametrize("L", [1, 3])
def test_limit_kernels_equal_quadrature_oracle(getkey, L):
    X1 = jax.random.normal(getkey(), (4, 3), jnp.float64)
    X2 = jnp.concatenate([X1[:1], -X1[1:2], jax.random.normal(getkey(), (2, 3))])  # θ = 0, π
    net = gf.ReLUNet.init(getkey(), 3, (5,) * L, parametrization="ntk", dtype=jnp.float64)
    lim = gf.limit_kernels(net, X1, X2)
    sigmas, K, nngp = _oracle(X1, X2, L)
    for l in range(L):
        assert rel_err(lim.G[l], sigmas[l]) <= 1e-8
        assert rel_err(lim.K[l], K[l]) <= 1e-8
    assert rel_err(lim.total, sum(K)) <= 1e-8
    assert rel_err(lim.nngp, nngp) <= 1e-8
    # The square block is the kernel of X with itself, symmetric.
    sq = gf.limit_kernels(net, X1)
    assert rel_err(sq.total, gf.limit_kernels(net, X1, X1).total) <= 1e-14
    assert float(jnp.max(jnp.abs(sq.total - sq.total.T))) <= 1e-14


def test_vector_outputs_are_independent_in_the_limit(getkey):
    X = jax.random.normal(getkey(), (4, 3), jnp.float64)
    scalar = gf.limit_kernels(gf.ReLUNet.init(getkey(), 3, (5, 5), parametrization="ntk",
                                              dtype=jnp.float64), X)
    vector = gf.limit_kernels(gf.ReLUNet.init(getkey(), 3, (5, 5), out_dim=3,
                                              parametrization="ntk", dtype=jnp.float64), X)
    assert vector.total.shape == (4, 4, 3, 3)
    assert rel_err(vector.total, scalar.total[..., None, None] * jnp.eye(3)[None, None]) <= 1e-15


def test_monte_carlo_mean_of_wide_networks_converges_to_the_limit(getkey):
    """16 NTK-parametrized networks of width 4096 (L = 2): per layer, the mean of the finite
    kernel is within 4 standard errors of the limit, entry by entry."""
    X = jax.random.normal(getkey(), (4, 3), jnp.float64)
    width, n, rng = 4096, 16, np.random.default_rng(0)
    samples, layer_kernels = [], jax.jit(gf.layer_kernels)
    for _ in range(n):  # numpy draws: the test is about the limit, not about ReLUNet.init
        weights = [rng.standard_normal((width, 3)), rng.standard_normal((width, width))]
        net = gf.ReLUNet(weights, rng.standard_normal(width),
                         [1 / math.sqrt(3), 1 / math.sqrt(width), 1 / math.sqrt(width)], "ntk")
        samples.append(np.stack([np.asarray(k) for k in layer_kernels(net, X).K]))
    samples = np.stack(samples)  # (n, L, P, P)
    mean, se = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(n)
    lim = np.stack([np.asarray(k) for k in gf.limit_kernels(net, X).K])
    assert np.all(np.abs(mean - lim) <= 4 * se), np.abs(mean - lim) / se
    assert np.all(se <= 0.05 * np.abs(lim).max())  # the test has power: fluctuations are small


@pytest.mark.parametrize("parametrization", ["standard", "mean_field"])
def test_normalization_maps_every_parametrization_onto_the_ntk_kernels(getkey, parametrization):
    """From one key, the three parametrizations build the same effective weights and the
    same `s_out a` up to `1/√N_L` (mean field): the normalized kernels then coincide with the
    NTK-parametrized ones, so the Monte-Carlo convergence above carries over, each with its
    own width scaling."""
    key, X = getkey(), jax.random.normal(getkey(), (4, 3), jnp.float64)
    ntk = gf.ReLUNet.init(key, 3, (16, 32), parametrization="ntk", dtype=jnp.float64)
    other = gf.ReLUNet.init(key, 3, (16, 32), parametrization=parametrization,
                            dtype=jnp.float64)
    a, b = gf.layer_kernels(ntk, X), gf.layer_kernels(other, X)
    ca, cb = gf.limit_normalization(ntk), gf.limit_normalization(other)
    for l in range(2):
        assert rel_err(cb["K"][l] * b.K[l], ca["K"][l] * a.K[l]) <= 1e-12
        assert rel_err(cb["Q"][l] * b.Q[l], ca["Q"][l] * a.Q[l]) <= 1e-12
        assert rel_err(cb["G"][l] * b.G[l], ca["G"][l] * a.G[l]) <= 1e-12
    assert rel_err(gf.limit_kernels(other, X).total, gf.limit_kernels(ntk, X).total) == 0.0


def test_limit_normalization_and_refusals(getkey):
    net = gf.ReLUNet.init(getkey(), 3, (8, 16), parametrization="standard")
    c = gf.limit_normalization(net)
    assert np.allclose(c["K"], [1 / 3, 1 / 8]) and np.allclose(c["G"], [1 / 3, 1 / 8])
    mf = gf.limit_normalization(gf.ReLUNet.init(getkey(), 3, (8, 16), parametrization="mean_field"))
    assert np.allclose(mf["K"], 16) and float(mf["nngp"]) == 16
    X = jnp.ones((2, 3))
    custom = gf.ReLUNet(net.weights, net.readout, net.scales)
    with pytest.raises(ValueError, match="parametrization"):
        gf.limit_kernels(custom, X)
    masked = gf.ReLUNet.init(getkey(), 3, (8, 8), masks=[None, gf.Mask.banded((8, 8), 1)],
                             parametrization="ntk")
    with pytest.raises(ValueError, match="dense layers only"):
        gf.limit_kernels(masked, X)
    with pytest.raises(ValueError, match="X"):
        gf.limit_kernels(net, jnp.ones((2, 4)))


@pytest.mark.parametrize("parametrization", ["ntk", "standard", "mean_field"])
def test_richness_knob_gamma0(getkey, parametrization):
    """γ₀ divides the output; kernels then carry 1/γ₀², which `limit_normalization` undoes,
    and `natural_lr` multiplies η by γ₀² (times the parametrization's width factor)."""
    key, X = getkey(), jax.random.normal(getkey(), (5, 3), jnp.float64)
    base = gf.ReLUNet.init(key, 3, (16, 32), parametrization=parametrization, dtype=jnp.float64)
    lazy = gf.ReLUNet.init(key, 3, (16, 32), parametrization=parametrization, gamma0=0.25,
                           dtype=jnp.float64)
    assert rel_err(lazy(X), 4.0 * base(X)) <= 1e-15
    assert abs(float(gf.gamma0(lazy)) - 0.25) <= 1e-15
    ca, cb = gf.limit_normalization(base), gf.limit_normalization(lazy)
    ka, kb = gf.layer_kernels(base, X), gf.layer_kernels(lazy, X)
    for l in range(2):
        assert rel_err(cb["K"][l] * kb.K[l], ca["K"][l] * ka.K[l]) <= 1e-12
    width = {"ntk": 1.0, "mean_field": 32.0, "standard": 1 / 16}[parametrization]
    assert abs(float(gf.natural_lr(lazy, 2.0)) - 2.0 * 0.25**2 * width) <= 1e-15
    # η from natural_lr makes the residual dynamics the same for every γ₀: η K is invariant.
    assert rel_err(gf.natural_lr(lazy) * gf.collective_kernel(lazy, X),
                   gf.natural_lr(base) * gf.collective_kernel(base, X)) <= 1e-12
    with pytest.raises(ValueError, match="gamma0"):
        gf.ReLUNet.init(key, 3, (4,), gamma0=0.0)


def test_limit_study_measures_what_it_says(getkey):
    X, y = gf.teacher_student(getkey(), samples=16, in_dim=3, dtype=jnp.float64)
    st = gf.limit_study(X[:10], y[:10], X[10:], y[10:], widths=(8, 16), seeds=(0,),
                        settings=(("ntk", 1.0),), steps=4, progress=False)
    assert st.kernel_distance.shape == (1, 2, 1, 3) and st.test_loss.shape == (1, 2, 1)
    # One entry recomputed from the public functions it is made of.
    net = gf.ReLUNet.init(jax.random.key(0), 3, (16, 16), parametrization="ntk",
                          dtype=jnp.float64)
    lim, fin = gf.limit_kernels(net, X[:10]), gf.layer_kernels(net, X[:10])
    assert rel_err(st.kernel_distance[0, 1, 0, 0],
                   rel_err(fin.K[0], lim.K[0])) <= 1e-12
    lr = gf.natural_lr(net, 0.5)
    lazy = gf.lazy_predictions(fin.total, y[:10], net(X[:10]), lr=lr, steps=4,
                               K_test=gf.collective_kernel(net, X[10:], X[:10]),
                               f0_test=net(X[10:]))
    assert rel_err(st.lazy_own[0, 1, 0], 0.5 * jnp.sum((lazy.test[-1] - y[10:]) ** 2)) <= 1e-12
    trained = gf.simulate(net, X[:10], y[:10], steps=4, lr=lr).final
    assert rel_err(st.test_loss[0, 1, 0], 0.5 * jnp.sum((trained(X[10:]) - y[10:]) ** 2)) <= 1e-12
    slopes = st.slopes()
    assert slopes["kernel_distance"].shape == (1, 3) and np.all(np.isfinite(slopes["kernel_drift"]))
    assert "log-log slope" in st.table()
