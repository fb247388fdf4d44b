"""Cross kernels between two sets of sites (I9) and the infinite-width limit of the layer
kernels (I11), against autodiff, an independent quadrature oracle and Monte Carlo."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

import gramflow as gf


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
    kw = {"masks": [None, gf.Mask.block_diagonal((6, 6), 2)], "gains": 1.2, "skips": 0.3,
          "train": ("weights", "gains", "skips")} if structured else {}
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
        def layer_rows(X, l=l):
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
    """16 NTK-parametrized networks of width 2048 (L = 2): per layer, the mean of the finite
    kernel is within 4 standard errors of the limit, entry by entry."""
    X = jax.random.normal(getkey(), (4, 3), jnp.float64)
    width, n, rng = 2048, 16, np.random.default_rng(0)
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
    with pytest.raises(ValueError, match="X"):
        gf.limit_kernels(net, jnp.ones((2, 4)))


def test_structures_without_a_closed_form_are_refused_with_the_reason(getkey):
    X = jnp.ones((2, 3))
    # A banded mask cuts its band at the edges: rows of fan-in 2 and 3.
    banded = gf.ReLUNet.init(getkey(), 3, (8, 8), masks=[None, gf.Mask.banded((8, 8), 1)],
                             parametrization="ntk")
    with pytest.raises(ValueError, match=r"`net.masks\[1\]`: its rows have unequal fan-in \(2 to 3"):
        gf.limit_kernels(banded, X)
    with pytest.raises(ValueError, match="unequal fan-in"):
        gf.limit_normalization(banded)
    # First layer: units reading different input coordinates are not exchangeable.
    first = gf.ReLUNet.init(getkey(), 4, (8, 8), masks=[gf.Mask.block_diagonal((8, 4), 2), None])
    with pytest.raises(ValueError, match=r"`net.masks\[0\]`: the first-layer mask"):
        gf.limit_kernels(first, jnp.ones((2, 4)))
    # Skip paths, fixed or trained: h_l is a Gaussian plus a rectified Gaussian.
    for train in (("weights",), ("weights", "skips")):
        skip = gf.ReLUNet.init(getkey(), 3, (8, 8), skips=0.5, train=train)
        kind = "trained" if "skips" in train else "fixed"
        with pytest.raises(ValueError, match=rf"`net.skips`: layer\(s\) \[2\] have a skip path "
                                             rf"\({kind} α\).*not Gaussian"):
            gf.limit_kernels(skip, X)


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


# -- structured layers: gains and masks of equal fan-in -------------------------------------

def _circulant(n, fan_in):
    """A band that wraps around: every row reads `fan_in` consecutive inputs (equal fan-in)."""
    offset = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    return gf.Mask(offset < fan_in)


def _structured(key, structure, parametrization, d=4, width=8, L=3):
    """A depth-L network with the given structure. Gains differ per layer; `"masks"` drops
    one input coordinate on layer 1 (all rows equal), has two blocks on layer 2 and a
    circulant band of fan-in 3 on layer 3."""
    masks = gains = None
    train = ("weights",)
    if "masks" in structure:
        keep = np.ones((width, d), bool)
        keep[:, 1] = False
        masks = [gf.Mask(keep), gf.Mask.block_diagonal((width, width), 2),
                 _circulant(width, 3)][:L]
    if "gains" in structure:
        gains = jnp.asarray([1.3, 0.7, 1.1][:L], jnp.float64)
        train = ("weights", "gains") if "trained" in structure else train
    net = gf.ReLUNet.init(key, d, (width,) * L, parametrization=parametrization,
                          dtype=jnp.float64, masks=masks)
    return gf.ReLUNet(net.weights, net.readout, net.scales, parametrization, masks=net.masks,
                      gains=gains, train=train)


def _oracle_structured(X1, X2, net):
    """Σ_l, Γ_l, Ṡ_l entry by entry by quadrature (`_relu_moments`), with the gains applied
    at every layer (no use of homogeneity): `Σ_l = g_l² Γ_{l-1}`, `Q_l = Π_{m>l} g_m²
    Π_{m≥l} Ṡ_m`, `K_l = Σ_l ⊙ Q_l`, plus `NNGP / g_l²` for a trained gain (ntk, mean field)."""
    X1, X2 = np.asarray(X1), np.asarray(X2)
    L = net.depth
    g2 = np.ones(L) if net.gains is None else np.asarray(net.gains) ** 2
    cols = np.arange(X1.shape[1]) if net.masks is None else np.flatnonzero(net.masks[0].array[0])
    S1, S2 = X1[:, cols], X2[:, cols]
    n = len(cols)
    v1, v2, cov = g2[0] * (S1 * S1).sum(1) / n, g2[0] * (S2 * S2).sum(1) / n, g2[0] * S1 @ S2.T / n
    sigmas, grams, dots = [], [X1 @ X2.T / X1.shape[1]], []
    for l in range(L):
        sigmas.append(cov)
        gam, dot = np.empty_like(cov), np.empty_like(cov)
        for i in range(cov.shape[0]):
            for j in range(cov.shape[1]):
                gam[i, j], dot[i, j] = _relu_moments(v1[i], v2[j], cov[i, j])
        grams.append(gam)
        dots.append(dot)
        w1 = np.array([_relu_moments(v, v, v)[0] for v in v1])
        w2 = np.array([_relu_moments(v, v, v)[0] for v in v2])
        if l + 1 < L:
            v1, v2, cov = g2[l + 1] * w1, g2[l + 1] * w2, g2[l + 1] * gam
    nngp = grams[-1]
    Q = [np.prod(g2[l + 1:]) * np.prod(dots[l:], axis=0) for l in range(L)]
    K = [s * q for s, q in zip(sigmas, Q)]
    if "gains" in net.train and net.parametrization != "standard":
        K = [k + nngp / g2[l] for l, k in enumerate(K)]
    return grams[:L], Q, K, nngp


@pytest.mark.parametrize("structure,parametrization", [
    ("trained gains", "ntk"), ("trained gains", "mean_field"), ("trained gains", "standard"),
    ("fixed gains", "ntk"), ("masks", "ntk"), ("masks", "standard"),
    ("masks, trained gains", "mean_field")])
def test_structured_limit_equals_quadrature_oracle(getkey, structure, parametrization):
    X1 = jax.random.normal(getkey(), (4, 4), jnp.float64)
    X2 = jnp.concatenate([X1[:1], -X1[1:2], jax.random.normal(getkey(), (1, 4))])  # θ = 0, π
    net = _structured(getkey(), structure, parametrization)
    lim = gf.limit_kernels(net, X1, X2)
    G, Q, K, nngp = _oracle_structured(X1, X2, net)
    for l in range(net.depth):
        assert rel_err(lim.G[l], G[l]) <= 1e-8
        assert rel_err(lim.Q[l], Q[l]) <= 1e-8
        assert rel_err(lim.K[l], K[l]) <= 1e-8
    assert rel_err(lim.total, sum(K)) <= 1e-8
    assert rel_err(lim.nngp, nngp) <= 1e-8
    # Vector outputs: the same kernels times the identity in the output indices.
    vec = gf.ReLUNet(net.weights, jnp.stack([net.readout] * 2, axis=1), net.scales,
                     parametrization, masks=net.masks, gains=net.gains, train=net.train)
    assert rel_err(gf.limit_kernels(vec, X1, X2).total,
                   lim.total[..., None, None] * jnp.eye(2)[None, None]) <= 1e-15


def test_gain_term_is_f_f_over_g_squared_at_every_width(getkey):
    """The identity behind the trained-gain limit: `u_μ = s_l Δ_l·((W ⊙ M) z_{l-1}) = f_μ / g_l`
    (Euler's identity for the homogeneous map z_l ↦ f), so the gain's kernel term is
    `f fᵀ / g_l²` — a finite-width fact, which is why that term does not concentrate."""
    X = jax.random.normal(getkey(), (5, 4), jnp.float64)
    net = _structured(getkey(), "masks, trained gains", "ntk", width=6)
    fixed = gf.ReLUNet(net.weights, net.readout, net.scales, "ntk", masks=net.masks,
                       gains=net.gains, train=("weights",))
    full, weights, f = gf.layer_kernels(net, X), gf.layer_kernels(fixed, X), net(X)
    for l in range(net.depth):
        assert rel_err(full.K[l] - weights.K[l], jnp.outer(f, f) / net.gains[l] ** 2) <= 1e-12


def _monte_carlo(draw, *args, n=16, seed=0):
    """`draw(key, *args)` (a list of arrays) for `n` keys, one compiled program run per key:
    the list of the stacked arrays, `(n, ...)` each. Large arrays go in `args`, not in a
    closure (a closed-over array becomes a constant of the program, slow to lower)."""
    one = jax.jit(draw)
    runs = [one(k, *args) for k in jax.random.split(jax.random.key(seed), n)]
    return [np.stack([np.asarray(r[i]) for r in runs]) for i in range(len(runs[0]))]


def _within_4_se(samples, lim, *, power=True):
    mean, se = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - lim) <= 4 * se), np.abs(mean - lim) / se
    if power:
        assert np.all(se <= 0.05 * np.abs(lim).max())


def test_monte_carlo_trained_gains(getkey):
    """16 NTK networks of width 2048 (L = 2) with gains (1.3, 0.7). The weight part of each
    K_l (the same network with the gains fixed) concentrates on `Σ_l ⊙ Q_l`. The trained
    gains' term `f fᵀ / g_l²` does not concentrate, but its mean is `NNGP / g_l²`: the mean of
    the full K_l is within 4 standard errors of the limit; and averaged over the Gaussian
    readout alone, `E_a[f fᵀ] = s_out² Z_L Z_Lᵀ` does concentrate, on the NNGP."""
    X = jax.random.normal(getkey(), (4, 3), jnp.float64)
    width, gains = 2048, jnp.asarray([1.3, 0.7], jnp.float64)
    scales = jnp.asarray([1 / math.sqrt(3), 1 / math.sqrt(width), 1 / math.sqrt(width)])

    def build(key):
        k1, k2, k3 = jax.random.split(key, 3)
        weights = [jax.random.normal(k1, (width, 3), jnp.float64),
                   jax.random.normal(k2, (width, width), jnp.float64)]
        a = jax.random.normal(k3, (width,), jnp.float64)
        nets = [gf.ReLUNet(weights, a, scales, "ntk", gains=gains, train=train)
                for train in (("weights", "gains"), ("weights",))]
        features = gf.ReLUNet(weights, jnp.eye(width), scales, "ntk", gains=gains)(X)
        return nets, features  # features = s_out Z_L, (P, N_L)

    def draw(key):
        nets, features = build(key)
        return [jnp.stack(gf.layer_kernels(net, X).K) for net in nets] + [features @ features.T]

    full, fixed, readout_mean = _monte_carlo(draw)
    net_full, net_fixed = build(jax.random.key(0))[0]
    lim = gf.limit_kernels(net_full, X)
    lim_full, lim_fixed = np.stack(lim.K), np.stack(gf.limit_kernels(net_fixed, X).K)
    _within_4_se(fixed, lim_fixed)
    _within_4_se(full, lim_full, power=False)  # the gain term fluctuates at order one
    _within_4_se(full - fixed, lim_full - lim_fixed, power=False)
    gain_terms = np.stack([np.asarray(lim.nngp) / float(g) ** 2 for g in gains])
    assert rel_err(lim_full - lim_fixed, gain_terms) <= 1e-12
    _within_4_se(readout_mean[:, None] / np.asarray(gains)[None, :, None, None] ** 2,
                 gain_terms)  # with power: this one concentrates


def test_monte_carlo_masks_of_equal_fan_in(getkey):
    """16 standard-parametrized networks of width 2048 (L = 2): layer 1 drops one of 4 input
    coordinates (n_1 = 3), layer 2 has two blocks (n_2 = 1024). The mean of `K_l / n_l`
    (`limit_normalization`) is within 4 standard errors of the dense limit with n_l."""
    X = jax.random.normal(getkey(), (4, 4), jnp.float64)
    width = 2048
    keep = np.ones((width, 4), bool)
    keep[:, 1] = False
    masks = (gf.Mask(keep), gf.Mask.block_diagonal((width, width), 2))
    M = [jnp.asarray(m.array, jnp.float64) for m in masks]
    scales = jnp.ones((3,), jnp.float64)

    def draw(key, M):
        k1, k2, k3 = jax.random.split(key, 3)
        weights = [M[0] * jax.random.normal(k1, (width, 4), jnp.float64) / math.sqrt(3),
                   M[1] * jax.random.normal(k2, (width, width), jnp.float64) / math.sqrt(1024)]
        a = jax.random.normal(k3, (width,), jnp.float64) / math.sqrt(width)
        net = gf.ReLUNet(weights, a, scales, "standard", masks=masks)
        return [jnp.stack(gf.layer_kernels(net, X).K)]

    (samples,) = _monte_carlo(draw, M)
    net = gf.ReLUNet([0 * M[0], 0 * M[1]], jnp.zeros((width,)), scales, "standard",
                     masks=masks)  # the limit reads the structure only
    c = np.asarray(gf.limit_normalization(net)["K"])
    assert np.allclose(c, [1 / 3, 1 / 1024])
    _within_4_se(samples * c[None, :, None, None], np.stack(gf.limit_kernels(net, X).K))
