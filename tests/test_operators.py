"""The Gram-operator hierarchy (I4–I6): materialized operators against per-sample Jacobians,
matrix-free against materialized, truncated and frozen closures, size refusal, scope errors."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import WIDTHS, assert_rel_close, pid, problem, rel_err

import gramflow as gf


@functools.partial(jax.jit, static_argnames=("kind", "k", "l"))
def _jacobians(weights, scales, X, kind, k, l):
    """Per-sample `∂h_l/∂h_k` (`kind="h"`, shape `(P, N_l, N_k)`) or `∂z_k/∂z_l` (`"z"`,
    `(P, N_k, N_l)`) by jax.jacrev of a plain per-sample function, vmapped over the samples
    and jitted (one program per layer pair and shape)."""
    relu = lambda h: jnp.where(h > 0, h, 0.0)  # noqa: E731

    def one(x):
        hs, z = [], x
        for s, W in zip(scales[:-1], weights):
            hs.append(s * (W @ z))
            z = relu(hs[-1])
        if kind == "h":
            def f(h):
                for j in range(k, l):
                    h = scales[j] * (weights[j] @ relu(h))
                return h

            return jax.jacrev(f)(hs[k - 1])

        def g(z):
            for j in range(l, k):
                z = relu(scales[j] * (weights[j] @ z))
            return z

        return jax.jacrev(g)(relu(hs[l - 1]))

    return jax.vmap(one)(X)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_operators_equal_jacobian_definitions(getkey, depth):
    net, X, _ = problem(getkey(), depth)
    G = gf.pushforward_operators(net, X)
    M = gf.pullback_operators(net, X)
    L = depth
    assert sorted(G) == [(k, l) for k in range(1, L + 1) for l in range(k + 1, L + 1)]
    assert sorted(M) == [(k, l) for k in range(2, L) for l in range(1, k)]
    for (k, l), op in G.items():
        J = _jacobians(net.weights, net.scales, X, "h", k, l)  # (P, N_l, N_k)
        assert op.shape == (6, 6, WIDTHS[L][l - 1], WIDTHS[L][l - 1])
        assert_rel_close(op, jnp.einsum("mak,nbk->mnab", J, J), jnp.float64, what=f"G{(k, l)}")
    for (k, l), op in M.items():
        J = _jacobians(net.weights, net.scales, X, "z", k, l)  # (P, N_k, N_l)
        assert_rel_close(op, jnp.einsum("mka,nkb->mnab", J, J), jnp.float64, what=f"M{(k, l)}")


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_matrix_free_equals_materialized(getkey, depth, out_dim):
    """(I6): the engines' matrix-free velocities equal (I4)/(I5) with materialized operators."""
    net, X, y = problem(getkey(), depth, out_dim=out_dim)
    assert_rel_close(gf.hierarchy_velocities(net, X, y), gf.velocities(net, X, y),
                     jnp.float64, what="velocities")


def test_contraction_identity(getkey):
    """(I6): Σ_ν c_{μν} 𝔊^{k→l}_{μν} Δ_{l,ν} = J^h_{l←k,μ} (Σ_ν c_{μν} Δ_{k,ν})."""
    net, X, y = problem(getkey(), 3)
    G = gf.pushforward_operators(net, X)
    Delta = gf.collective_state(net, X, y).Delta
    c = jax.random.normal(getkey(), (6, 6))
    for (k, l), op in G.items():
        lhs = jnp.einsum("mn,mnab,nb->ma", c, op, Delta[l - 1])
        J = _jacobians(net.weights, net.scales, X, "h", k, l)
        rhs = jnp.einsum("mak,mk->ma", J, c @ Delta[k - 1])
        assert_rel_close(lhs, rhs, jnp.float64, what=f"I6 {(k, l)}")


def _run(net, X, y, **kw):
    return gf.simulate(net, X, y, steps=60, lr=0.05, record_every=20, reference=gf.Weights(),
                       observables=("loss",), **kw)


def _local():
    return gf.Collective(closure=gf.TruncatedTransport(0))


def _frozen():
    return gf.Collective(closure=gf.FrozenOperators())


def _task(key, widths):
    kd, kn = jax.random.split(key)
    X, y = gf.teacher_student(kd, samples=10, in_dim=4)
    return gf.ReLUNet.init(kn, 4, widths), X, y


def test_transport_none_is_exact(getkey):
    net, X, y = _task(getkey(), (12, 10, 8))
    traj = _run(net, X, y, engine=gf.Collective())  # no closure: the exact hierarchy
    assert float(traj.observables["closure_error"].max()) <= 1e-12
    assert float(traj.observables["field_error"].max()) <= 1e-12


@pytest.mark.parametrize("closure", [gf.TruncatedTransport(0), gf.FrozenOperators()],
                         ids=["transport0", "frozen"])
def test_one_hidden_layer_closures_are_exact(getkey, closure):
    net, X, y = _task(getkey(), (16,))
    traj = _run(net, X, y, engine=gf.Collective(closure=closure))
    assert float(traj.observables["closure_error"].max()) <= 1e-12
    ts = jnp.linspace(0.0, 0.2, 3)
    ft = gf.flow(net, X, y, t1=0.2, ts=ts, engine=gf.Collective(closure=closure),
                 reference=gf.Weights(), observables=("loss",),
                 stepsize_controller=pid(1e-12, 1e-12, dtmin=1e-3 * 0.2))
    assert float(ft.observables["closure_error"].max()) <= 1e-10


# L = 2 (the first transport) and L = 3 (nested transport, 𝔊^{1→3}); deeper networks only
# repeat the recursion (L = 4: test_operators_equal_jacobian_definitions and
# test_matrix_free_equals_materialized).
@pytest.mark.parametrize("widths", [(12, 10), (12, 10, 8)])
def test_dropping_transport_errs(getkey, widths):
    net, X, y = _task(getkey(), widths)
    local = _run(net, X, y, engine=_local())
    full = _run(net, X, y, engine=gf.Collective(closure=gf.TruncatedTransport(len(widths) - 1)))
    frozen = _run(net, X, y, engine=_frozen())
    e_local = float(local.observables["closure_error"][-1])
    e_full = float(full.observables["closure_error"][-1])
    assert e_local > 1e-6
    assert float(frozen.observables["closure_error"][-1]) > 1e-6
    assert e_full < e_local  # keeping the transport helps


def test_closures_in_continuous_time(getkey):
    net, X, y = _task(jax.random.key(2), (12, 10, 8))
    kw = dict(t1=0.3, ts=jnp.linspace(0, 0.3, 4), reference=gf.Weights(),
              observables=("loss",), stepsize_controller=pid(1e-10, 1e-12, dtmin=1e-4 * 0.3))
    local = gf.flow(net, X, y, engine=_local(), **kw)
    frozen = gf.flow(net, X, y, engine=_frozen(), **kw)
    assert float(local.observables["closure_error"][-1]) > 1e-6
    assert float(frozen.observables["closure_error"][-1]) > 1e-6


def test_size_refusal(getkey):
    net = gf.ReLUNet.init(getkey(), 3, (64, 64, 64))
    X = jnp.ones((40, 3))
    for fn in (gf.pushforward_operators, gf.pullback_operators):
        with pytest.raises(ValueError, match=r"would materialize [\d,]+ bytes .* above max_bytes = 1,000,000"):
            fn(net, X, max_bytes=1_000_000)
    assert gf.pushforward_operators(net, X[:2], max_bytes=1_000_000)[(1, 2)].shape == (2, 2, 64, 64)
    with pytest.raises(ValueError, match="'operator_drift' materializes"):
        big = gf.ReLUNet.init(getkey(), 3, (512, 512))
        gf.simulate(big, jnp.ones((64, 3)), jnp.ones(64), steps=2, lr=0.1,
                    observables=("operator_drift",))


def test_operator_summary(getkey):
    net, X, _ = problem(getkey(), 3)
    op = gf.pushforward_operators(net, X)[(1, 3)]
    summary = gf.operator_summary(op)
    jac = _jacobians(net.weights, net.scales, X, "h", 1, 3)  # (P, N_3, N_1)
    J = jac.reshape(-1, jac.shape[-1])  # (P·N_3, N_1): rows (μ, a)
    eig = jnp.sort(jnp.linalg.eigvalsh(J @ J.T))[::-1]
    assert_rel_close(summary.spectrum, eig, jnp.float64, what="block spectrum")
    assert float(summary.spectrum.min()) > -1e-12  # PSD
    for m in range(3):
        assert_rel_close(summary.block_spectra[m], jnp.linalg.eigvalsh(op[m, m])[::-1], jnp.float64)
    assert_rel_close(summary.block_singular_values[0, 1], jnp.linalg.svd(op[0, 1])[1], jnp.float64)
    identity = jnp.broadcast_to(jnp.eye(op.shape[-1]), op.shape)
    locality = np.linalg.norm(op - identity) / np.linalg.norm(identity)
    assert abs(float(summary.locality) - locality) <= 1e-12
    assert_rel_close(gf.block_operator(op), (J @ J.T), jnp.float64, what="block operator")


def test_operator_drift_observable(getkey):
    net, X, y = _task(getkey(), (7, 6, 5))
    traj = gf.simulate(net, X, y, steps=20, lr=0.1, record_every=20,
                       observables=("operator_drift",))
    pairs = gf.operator_pairs(3)
    before = {**gf.pushforward_operators(net, X), **gf.pullback_operators(net, X)}
    after = {**gf.pushforward_operators(traj.final, X), **gf.pullback_operators(traj.final, X)}
    expected = [rel_err(after[(k, l)], before[(k, l)]) for _, k, l in pairs]
    assert np.allclose(traj.observables["operator_drift"][-1], expected, atol=1e-12)
    assert float(traj.observables["operator_drift"][0].max()) == 0.0
    frozen = gf.simulate(net, X, y, steps=20, lr=0.1, record_every=20, engine=_frozen(),
                         observables=("operator_drift",))
    assert float(jnp.abs(frozen.observables["operator_drift"]).max()) == 0.0


def test_scope_error_for_biased_or_non_homogeneous_networks(getkey):
    mlp = eqx.nn.MLP(3, "scalar", 8, 2, activation=jnp.tanh, key=getkey())
    X, y = jnp.ones((4, 3)), jnp.ones(4)
    for fn in (gf.pushforward_operators, gf.pullback_operators, gf.collective_kernel):
        with pytest.raises(TypeError, match="positively homogeneous.*biases and activations"):
            fn(mlp, X)
    with pytest.raises(TypeError, match="z_k = J"):
        gf.simulate(mlp, X, y, steps=2, lr=0.1, engine=_local())


def test_bad_closure_options(getkey):
    # Closures are objects of the collective engine only (a closure elsewhere cannot be
    # expressed); a bad transport is refused when the closure is built.
    for bad in (-1, True, 1.5, None):
        with pytest.raises(ValueError, match="`transport` must be an int ≥ 0"):
            gf.TruncatedTransport(bad)
    net, X, y = _task(getkey(), (6, 5))
    with pytest.raises(TypeError, match="engine object, not the string"):
        gf.simulate(net, X, y, steps=2, lr=0.1, engine="collective")


def test_bad_frozen_operators_transport():
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="`transport` must be"):
            gf.FrozenOperators(transport=bad)


def test_collective_refuses_a_closure_that_is_not_one():
    for bad in ("frozen", 0, gf.Weights()):
        with pytest.raises(TypeError, match="closure"):
            gf.Collective(closure=bad)


def test_closure_study_small(getkey):
    X, y = gf.teacher_student(getkey(), samples=8, in_dim=3)
    study = gf.closure_study(X, y, depths=(1, 2), widths=(8, 16), seeds=(0, 1), steps=10,
                             record_every=5, progress=False)
    assert study.error.shape == (4, 2, 2, 2, 3) and study.loss.shape == (2, 2, 2, 3)
    assert study.step.tolist() == [0, 5, 10]
    final = study.final()
    c = {name: i for i, name in enumerate(study.closures)}
    for name in ("layer_local", "frozen_operators", "full_transport"):
        assert final[c[name], 0].max() <= 1e-12  # L = 1: every field closure is exact
    assert final[c["frozen_kernel"], 0].min() > 1e-8
    assert final[c["layer_local"], 1].min() > 1e-6  # L = 2: dropping transport errs
    with pytest.raises(ValueError, match="unknown closure"):
        gf.closure_study(X, y, closures=("nope",))
