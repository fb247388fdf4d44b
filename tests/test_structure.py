"""Structured layers (pathway masks, gains, skip paths) against autodiff of an independent
plain function, through every entry point."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gramflow as gf
from gramflow import Mask

from helpers import pid, rel_err

D_IN = 5
WIDTHS = {1: (5,), 2: (7, 7), 3: (6, 6, 5)}  # each depth has a square layer for a skip path


def _masks(kind, d, widths):
    fan_in = (d, *widths[:-1])
    build = {
        "block": lambda s: Mask.block_diagonal(s, 2),
        "banded": lambda s: Mask.banded(s, 1),
        "random": lambda s: Mask.random(s, 0.5, seed=s[0] * 7 + s[1]),
    }[kind]
    return [build((n, m)) for n, m in zip(widths, fan_in)]


STRUCTURES = {
    "block": lambda d, w: dict(masks=_masks("block", d, w)),
    "banded": lambda d, w: dict(masks=_masks("banded", d, w)),
    "random": lambda d, w: dict(masks=_masks("random", d, w)),
    "gains": lambda d, w: dict(gains=1.2),
    "skips_fixed": lambda d, w: dict(skips=0.6),
    "skips_trained": lambda d, w: dict(skips=0.6, train=("weights", "skips")),
    "gains_only": lambda d, w: dict(gains=0.9, train=("gains",)),
    "all": lambda d, w: dict(masks=_masks("block", d, w), gains=1.1, skips=0.5,
                             train=("weights", "gains", "skips")),
}


def structured_f(net, X):
    """`h_l = g_l s_l (W_l ⊙ M_l) z + α_l z`, written independently of gramflow (masks as
    `where`, relu with relu'(0) = 0)."""
    z = X
    for l, W in enumerate(net.weights):
        if net.masks is not None and net.masks[l] is not None:
            W = jnp.where(jnp.asarray(net.masks[l].array), W, 0.0)
        h = net.scales[l] * jnp.einsum("pi,ni->pn", z, W)
        if net.gains is not None:
            h = net.gains[l] * h
        if net.skips is not None and net.skips[l] is not None:
            h = h + net.skips[l] * z
        z = jnp.where(h > 0, h, 0.0)
    return net.scales[-1] * jnp.einsum("pn,n...->p...", z, net.readout)


def _spec(net):
    """Trained leaves, built independently of gramflow's own filter."""
    spec = jax.tree.map(lambda _: False, net)
    return eqx.tree_at(
        lambda n: (n.weights, n.gains, n.skips), spec,
        (tuple("weights" in net.train for _ in net.weights),
         None if net.gains is None else "gains" in net.train,
         None if net.skips is None else tuple(("skips" in net.train) and a is not None
                                              for a in net.skips)),
        is_leaf=lambda x: x is None)


def build(key, depth, name, out_dim=None, dtype=jnp.float64, P=7):
    kn, kx, ky = jax.random.split(key, 3)
    widths = WIDTHS[depth]
    net = gf.ReLUNet.init(kn, D_IN, widths, out_dim=out_dim, dtype=dtype,
                          **STRUCTURES[name](D_IN, widths))
    X = jax.random.normal(kx, (P, D_IN), dtype)
    y = jax.random.normal(ky, (P,) if out_dim is None else (P, out_dim), dtype)
    return net, X, y


def _flat_jacobian(net, X):
    params, rest = eqx.partition(net, _spec(net))
    jac = jax.jacrev(lambda p: structured_f(eqx.combine(p, rest), X))(params)
    P = X.shape[0]
    k = 1 if net.out_dim is None else net.out_dim
    return jnp.concatenate([j.reshape(P * k, -1) for j in jax.tree.leaves(jac)], axis=1)


def _flat(K):
    return K if K.ndim == 2 else K.transpose(0, 2, 1, 3).reshape(K.shape[0] * K.shape[2], -1)


# Every structure at depth 3 (the full recursion); vector outputs for each kind of kernel
# term (masked weights, gains, skips); depths 1 and 2 for the combination of all of them.
CASES = [(name, 3, None) for name in sorted(STRUCTURES)]
CASES += [(name, 3, 2) for name in ("random", "gains", "skips_trained", "all")]
CASES += [("all", depth, out) for depth in (1, 2) for out in (None, 2)]


@pytest.mark.parametrize("name,depth,out_dim", CASES)
def test_kernels_and_gradients_match_autodiff(getkey, name, depth, out_dim):
    net, X, y = build(getkey(), depth, name, out_dim)
    params, rest = eqx.partition(net, _spec(net))
    ref = jax.grad(lambda p: 0.5 * jnp.sum((structured_f(eqx.combine(p, rest), X) - y) ** 2))(
        params)
    got = gf.parameter_gradients(net, X, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert rel_err(a, b) <= 1e-10
    if "weights" in net.train:
        for a, b in zip(gf.pullback_gradients(net, X, y), ref.weights, strict=True):
            assert rel_err(a, b) <= 1e-10
    J = _flat_jacobian(net, X)
    K_ref = J @ J.T
    assert rel_err(_flat(gf.collective_kernel(net, X)), K_ref) <= 1e-10
    assert rel_err(_flat(gf.collective_kernel(net, X, block_size=3)), K_ref) <= 1e-10
    lk = gf.layer_kernels(net, X)
    assert rel_err(_flat(lk.total), K_ref) <= 1e-10
    # Residual flow (I2).
    _, df = jax.jvp(lambda p: structured_f(eqx.combine(p, rest), X), (params,),
                    (jax.tree.map(jnp.negative, ref),))
    assert rel_err(gf.velocities(net, X, y).r, df) <= 1e-10
    # K r without K: see test_kernel_matvec_of_structured_networks (same cases).


@pytest.mark.parametrize("name,depth,out_dim", CASES)
def test_kernel_matvec_of_structured_networks(getkey, name, depth, out_dim):
    net, X, y = build(getkey(), depth, name, out_dim)
    params, rest = eqx.partition(net, _spec(net))
    ref = jax.grad(lambda p: 0.5 * jnp.sum((structured_f(eqx.combine(p, rest), X) - y) ** 2))(
        params)
    r = structured_f(net, X) - y
    _, df = jax.jvp(lambda p: structured_f(eqx.combine(p, rest), X), (params,),
                    (jax.tree.map(jnp.negative, ref),))
    assert rel_err(gf.kernel_matvec(net, X, r), df * -1) <= 1e-10


@pytest.mark.parametrize("name", ["all", "gains_only"])
def test_layer_kernels_per_layer_and_float32(getkey, name):
    net, X, y = build(getkey(), 3, name)
    params, rest = eqx.partition(net, _spec(net))
    jac = jax.jacrev(lambda p: structured_f(eqx.combine(p, rest), X))(params)
    lk = gf.layer_kernels(net, X)
    for l in range(net.depth):
        parts = [jac.weights[l].reshape(X.shape[0], -1)] if "weights" in net.train else []
        if "gains" in net.train:
            parts.append(jac.gains[:, l:l + 1])
        if "skips" in net.train and net.skips[l] is not None:
            parts.append(jac.skips[l].reshape(-1, 1))
        J = jnp.concatenate(parts, axis=1)
        assert rel_err(lk.K[l], J @ J.T) <= 1e-10
    report = gf.verify(net, X, y)  # verify covers every trained parameter of every structure
    assert report.ok() and report.max_error < 1e-13, str(report)
    net32, X32, y32 = build(getkey(), 3, name, dtype=jnp.float32)
    # Compiled as one program: eagerly every small float32 operation of this new shape would
    # compile on its own (eager verify of structured networks: just above, in float64).
    report = jax.jit(gf.verify)(net32, X32, y32)
    assert report.ok(), str(report)
    assert report.dtype == "float32"


def test_velocities_of_fields_match_jvp(getkey):
    net, X, y = build(getkey(), 3, "all", out_dim=2)
    params, rest = eqx.partition(net, _spec(net))
    grads = gf.parameter_gradients(net, X, y)
    direction = jax.tree.map(jnp.negative, grads)

    def H_of(p):
        return gf.collective_state(eqx.combine(p, rest), X, y).H

    _, dH = jax.jvp(H_of, (params,), (direction,))
    v = gf.velocities(net, X, y)
    for a, b in zip(v.H, dH, strict=True):
        assert rel_err(a, b) <= 1e-10
    # The discrete remainder (I7) is O(η²) for a structured network too.
    n1 = gf.step_remainder(net, X, y, lr=1e-3).norms()["r"]
    n2 = gf.step_remainder(net, X, y, lr=5e-4).norms()["r"]
    assert 3.8 < float(n1 / n2) < 4.2


def _off_mask(net):
    return [float(jnp.abs(jnp.where(m.array, 0.0, w)).max())
            for w, m in zip(net.weights, net.masks)]


def test_masked_weights_stay_masked_under_every_engine(getkey):
    net, X, y = build(getkey(), 3, "all")
    assert _off_mask(net) == [0.0, 0.0, 0.0]
    for engine, lr in ((gf.Weights(), 0.05), (gf.Weights(optimizer=optax.adam(1e-2)), None)):
        traj = gf.simulate(net, X, y, steps=25, lr=lr, engine=engine)
        assert _off_mask(traj.final) == [0.0, 0.0, 0.0]
    col = gf.simulate(net, X, y, steps=25, lr=0.05, engine=gf.Collective())
    assert _off_mask(col.final) == [0.0, 0.0, 0.0]  # W_1 rebuilt from its coefficient too
    assert [float(jnp.abs(jnp.where(m.array, 0.0, p.weight)).max())
            for p, m in zip(col.state.weights[1:], net.masks[1:])] == [0.0, 0.0]
    # The weights did move, inside the masks.
    assert min(float(jnp.abs(a - b).max()) for a, b in zip(net.weights, col.final.weights)) > 1e-4
    # Under the flow (weights and collective engines): test_flows_agree_and_balance_laws_hold.


@pytest.mark.parametrize("name", ["banded", "gains", "skips_trained", "all"])
def test_collective_engine_equals_gradient_descent(getkey, name):
    net, X, y = build(getkey(), 3, name)
    obs = ("r", "kernel_trace", "kernel_eigs")
    w = gf.simulate(net, X, y, steps=40, lr=0.05, observables=obs)
    c = gf.simulate(net, X, y, steps=40, lr=0.05, engine=gf.Collective(), observables=obs)
    assert rel_err(c.r, w.r) <= 1e-10
    for key in ("kernel_trace", "kernel_eigs"):
        assert rel_err(c.observables[key], w.observables[key]) <= 1e-10
    # Recorded kernel traces are those of the structured kernel.
    lk = gf.layer_kernels(w.final, X)
    assert rel_err(w.observables["kernel_trace"][-1], jnp.stack([jnp.trace(k) for k in lk.K])) <= 1e-10
    # Frozen kernel of a structured network: r(t) = exp(−ηK₀t) r₀ with its own K₀.
    fk = gf.flow(net, X, y, t1=0.3, lr=0.5, engine=gf.FrozenKernel(), observables=("r",),
                 ts=jnp.array([0.3]))
    K0 = gf.collective_kernel(net, X)
    expect = jax.scipy.linalg.expm(-0.5 * 0.3 * K0) @ (net(X) - y)
    assert rel_err(fk.r[-1], expect) <= 1e-8


def test_flows_agree_and_balance_laws_hold(getkey):
    kd, kn = jax.random.split(getkey())
    X, y = gf.teacher_student(kd, samples=8, in_dim=4)
    masks = _masks("block", 4, (8, 8, 6))
    net = gf.ReLUNet.init(kn, 4, (8, 8, 6), masks=masks, gains=1.0)
    ts = jnp.array([0.1, 0.2])
    w = gf.flow(net, X, y, t1=0.2, ts=ts, lr=1.0, stepsize_controller=pid(1e-12, 1e-12),
                observables=("r",))
    c = gf.flow(net, X, y, t1=0.2, ts=ts, lr=1.0, engine=gf.Collective(),
                stepsize_controller=pid(1e-12, 1e-12), observables=("r",))
    assert rel_err(c.r, w.r) <= 1e-8
    # Masked weights stay masked under both flows: the weights engine's, and the collective
    # engine's carried W_2..W_L and the W_1 it rebuilds; the weights did move, inside the masks.
    assert _off_mask(net) == _off_mask(w.final) == _off_mask(c.final) == [0.0, 0.0, 0.0]
    assert [float(jnp.abs(jnp.where(m.array, 0.0, p.weight)).max())
            for p, m in zip(c.state.weights[1:], net.masks[1:])] == [0.0, 0.0]
    assert min(float(jnp.abs(a - b).max()) for a, b in zip(net.weights, w.final.weights)) > 1e-4
    for b0, b1 in zip(gf.diagnostics.balance(net), gf.diagnostics.balance(w.final)):
        assert float(jnp.abs(b1 - b0).max()) <= 1e-8 * (1 + float(jnp.abs(b0).max()))
    g0, g1 = gf.diagnostics.gain_balance(net), gf.diagnostics.gain_balance(w.final)
    assert float(jnp.abs(g1 - g0).max()) <= 1e-8 * (1 + float(jnp.abs(g0).max()))
    assert float(jnp.abs(w.final.gains - net.gains).max()) > 1e-4  # the gains did move
    # A skip path breaks the per-neuron law of the layers it bypasses.
    skip = gf.ReLUNet.init(kn, 4, (8, 8, 6), skips=[None, 0.5, None])
    assert [b is None for b in gf.diagnostics.balance(skip)] == [True, True]


def test_sweep_with_structure_equals_separate_runs(getkey):
    X, y = gf.teacher_student(getkey(), samples=8, in_dim=4)

    def structure(d, arch):
        return dict(masks=_masks("block", d, arch), gains=1.0)

    res = gf.sweep(X, y, widths=(4, 6), depths=(2,), seeds=(0, 1), lrs=(0.05, 0.1), steps=15,
                   engine=gf.Collective(), structure=structure, progress=False,
                   observables=("kernel_trace",))
    # One reference run: width 4, padded (masks too) to the bucket's 6, at seed and lr index 1
    # (the unpadded member and the indexing of every axis: test_sweep.py).
    arch = (4, 4)
    net = gf.ReLUNet.init(jax.random.key(1), 4, arch, **structure(4, arch))
    t = gf.simulate(net, X, y, steps=15, lr=0.1, observables=("kernel_trace",))
    assert rel_err(res.loss[0, 0, 1, 1], t.loss) <= 1e-10
    assert rel_err(res.observables["kernel_trace"][0, 0, 1, 1],
                   t.observables["kernel_trace"]) <= 1e-10
    skips = gf.sweep(X, y, widths=(4, 6), depths=(2,), seeds=(0,), lrs=(0.05,), steps=5,
                     structure=dict(skips=0.5), progress=False)  # skip on layer 1 only at width 4
    assert bool(jnp.all(jnp.isfinite(skips.loss)))


def test_jit_and_vmap_over_structured_networks(getkey):
    masks = _masks("banded", D_IN, (6, 6))
    keys = jax.random.split(getkey(), 3)
    nets = jax.vmap(lambda k: gf.ReLUNet.init(k, D_IN, (6, 6), masks=masks, gains=1.0,
                                              skips=0.3))(keys)
    X = jax.random.normal(getkey(), (5, D_IN))
    K = jax.jit(jax.vmap(gf.collective_kernel, in_axes=(0, None)))(nets, X)
    for i in range(3):
        one = jax.tree.map(lambda a, i=i: a[i], nets)
        assert rel_err(K[i], gf.collective_kernel(one, X)) <= 1e-12


def test_structure_errors():
    with pytest.raises(ValueError, match="positively homogeneous"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4,), activation="tanh")
    with pytest.raises(ValueError, match="biases"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4,), bias=True)
    with pytest.raises(ValueError, match="only 0 and 1"):
        Mask(np.array([[0.5, 1.0]]))
    with pytest.raises(TypeError, match="static"):
        jax.vmap(lambda m: Mask(m))(jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="masks\\[0\\]"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4,), masks=[Mask.block_diagonal((4, 4), 2)])
    with pytest.raises(ValueError, match="equal widths"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4,), skips=[0.5])
    with pytest.raises(ValueError, match="no layer|none"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4, 5), skips=0.5)
    with pytest.raises(ValueError, match="train"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4,), train=("weights", "readout"))
    with pytest.raises(ValueError, match="no gains"):
        gf.ReLUNet.init(jax.random.key(0), 3, (4,), train=("gains",))


# Closures and materialized hierarchies were refused for structured networks; they now take
# every structure (the layer's local operators carry it), checked against autodiff and the
# weights engine.
HIERARCHY_CASES = [(name, 3, None) for name in sorted(STRUCTURES)]
HIERARCHY_CASES += [(name, 3, 2) for name in ("random", "gains", "skips_trained", "all")]
HIERARCHY_CASES += [("all", 2, None)]


@pytest.mark.parametrize("name,depth,out_dim", HIERARCHY_CASES)
def test_hierarchy_velocities_of_structured_networks(getkey, name, depth, out_dim):
    net, X, y = build(getkey(), depth, name, out_dim)
    hv = gf.hierarchy_velocities(net, X, y)
    v = gf.velocities(net, X, y)
    for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(v), strict=True):
        assert rel_err(a, b) <= 1e-10  # (I6): materialized = matrix-free
    # Against autodiff: the jvp of the fields along −∇L.
    params, rest = eqx.partition(net, _spec(net))
    grads = jax.grad(lambda p: 0.5 * jnp.sum((structured_f(eqx.combine(p, rest), X) - y) ** 2))(
        params)

    def fields_of(p):
        st = gf.collective_state(eqx.combine(p, rest), X, y)
        return st.r, st.H, st.B

    _, (dr, dH, dB) = jax.jvp(fields_of, (params,), (jax.tree.map(jnp.negative, grads),))
    assert rel_err(hv.r, dr) <= 1e-10
    for a, b in zip(hv.H, dH, strict=True):
        assert rel_err(a, b) <= 1e-10
    for a, b in zip(hv.B[:-1], dB[:-1], strict=True):
        assert rel_err(a, b) <= 1e-10
    assert float(jnp.abs(hv.B[-1]).max()) == 0.0  # fixed readout


def _closure_error(net, X, y, closure, lr):
    traj = gf.simulate(net, X, y, steps=1, lr=lr, engine=gf.Collective(closure=closure),
                       reference=gf.Weights(), observables=("loss",))
    return float(traj.observables["closure_error"][-1])


# (banded masks: test_engines.py's mask_gain_skip structure, whose closure steps are tied to
# the truncated velocities and those to autodiff)
@pytest.mark.parametrize("name", ["block", "gains", "skips_trained", "all"])
def test_closures_of_structured_networks(getkey, name):
    """A closure's step is an Euler step of its flow: keeping every term it differs from
    gradient descent by O(η²) (I7); dropping transport errs at O(η)."""
    net, X, y = build(getkey(), 3, name)
    full = gf.TruncatedTransport(net.depth - 1)
    e1, e2 = (_closure_error(net, X, y, full, lr) for lr in (1e-3, 5e-4))
    assert e1 > 0 and 3.5 < e1 / e2 < 4.5, (e1, e2)
    e1, e2 = (_closure_error(net, X, y, gf.FrozenOperators(), lr) for lr in (1e-3, 5e-4))
    assert 3.5 < e1 / e2 < 4.5, (e1, e2)  # frozen operators are exact at t = 0
    e1, e2 = (_closure_error(net, X, y, gf.TruncatedTransport(0), lr) for lr in (1e-3, 5e-4))
    assert 1.5 < e1 / e2 < 2.5, (e1, e2)


@pytest.mark.parametrize("name", ["block", "random", "skips_trained"])
def test_one_hidden_layer_closures_of_structured_networks_are_exact(getkey, name):
    """With one hidden layer linear in its trained parameters (masks, trained skip) there is
    no transport and the Euler step of H_1 is exact: every field closure is gradient descent."""
    net, X, y = build(getkey(), 1, name)
    for closure in (gf.TruncatedTransport(0), gf.FrozenOperators()):
        traj = gf.simulate(net, X, y, steps=40, lr=0.05, engine=gf.Collective(closure=closure),
                           reference=gf.Weights(), observables=("loss",), record_every=10)
        assert float(traj.observables["closure_error"].max()) <= 1e-12
        assert float(traj.observables["field_error"].max()) <= 1e-12


def test_mask_constructors_and_bicliques():
    m = Mask.block_diagonal((6, 4), 2)
    assert m.array.sum() == 12 and len(m.bicliques) == 2
    b = Mask.banded((8, 8), 1)
    assert (b.array.sum(1) <= 3).all() and b.array[np.arange(8), np.arange(8)].all()
    r = Mask.random((10, 7), 0.3, seed=1)
    assert r.array.any(axis=1).all() and r == Mask.random((10, 7), 0.3, seed=1)
    for mask in (m, b, r):  # the bicliques tile the mask exactly once
        cover = np.zeros(mask.shape, int)
        for rows, cols in mask.bicliques:
            cover[np.ix_(rows, cols)] += 1
        assert (cover == mask.array).all()
    assert hash(m) == hash(Mask(m.array)) and m != b


@pytest.mark.parametrize("form", ["connection", "biclique", "biclique_chunked"])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_both_forms_of_the_masked_kernel(getkey, monkeypatch, form, out_dim):
    import gramflow._algebra as algebra

    # Force one form through the cost model (a biclique costing nothing, or a fortune), and
    # chunks small enough that the scans run several steps.
    if form == "connection":
        cost = gf.CostModel(biclique_overhead=1e9, chunked_overhead=1e9, chunk_elements=64)
    else:
        cost = gf.CostModel(biclique_gram=0.0, biclique_overhead=0.0, chunked_overhead=0.0,
                            chunk_elements=64,
                            unrolled_bicliques=0 if form == "biclique_chunked" else 32)
    used = []  # which form each masked kernel took (spied, not changed)
    for name in ("_connection_kernel", "_biclique_kernel"):
        real = getattr(algebra, name)
        monkeypatch.setattr(algebra, name, lambda *a, _real=real, _name=name, **k: (
            used.append(_name), _real(*a, **k))[1])
    expected = "_connection_kernel" if form == "connection" else "_biclique_kernel"
    # The connection form does not see the mask's bicliques: one irregular mask. The biclique
    # forms: contiguous equal blocks (slices, one size group) and an irregular mask (gathers,
    # several size groups, padded chunks). Banded masks: test_kernels_and_gradients_match_autodiff.
    for kind in ("random",) if form == "connection" else ("block", "random"):
        net, X, y = build(getkey(), 3, kind, out_dim)
        J = _flat_jacobian(net, X)
        assert rel_err(_flat(gf.collective_kernel(net, X, cost=cost)), J @ J.T) <= 1e-10
        assert rel_err(_flat(gf.collective_kernel(net, X, block_size=4, cost=cost)),
                       J @ J.T) <= 1e-10
        assert rel_err(_flat(gf.layer_kernels(net, X, cost=cost).total), J @ J.T) <= 1e-10
    assert used and set(used) == {expected}, set(used)


def test_gain_kernel_closed_form(getkey):
    # Without skip paths f is homogeneous of degree one in each gain, ∂f/∂g_l = f/g_l, so the
    # gain terms of the kernel are Σ_l f fᵀ / g_l² — an outlier along f that sets λ_max.
    kn, kx = jax.random.split(getkey())
    X = jax.random.normal(kx, (9, D_IN))
    net = gf.ReLUNet.init(kn, D_IN, (6, 7, 5), gains=1.0, train=("gains",))
    net = eqx.tree_at(lambda n: n.gains, net, jnp.array([0.7, 1.3, 1.1]))
    f = net(X)
    expect = sum(jnp.outer(f, f) / g**2 for g in net.gains)
    assert rel_err(gf.collective_kernel(net, X), expect) <= 1e-12
    for K_l, g in zip(gf.layer_kernels(net, X).K, net.gains):
        assert rel_err(K_l, jnp.outer(f, f) / g**2) <= 1e-12
