"""Engines and closures as objects: resumable runs, optimizers as pytrees, the final network,
and closures / the materialized hierarchy for every layer structure, against autodiff."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gramflow as gf

# Every layer structure: dense; mask + gain + skip (all trained); skips only, with a layer
# that has no skip (that layer trains nothing).
STRUCTURES = {
    "dense": {},
    "mask_gain_skip": lambda d, w: dict(
        masks=[None] + [gf.Mask.banded((n, m), 1) for n, m in zip(w[1:], w[:-1])],
        gains=1.1, skips=0.5, train=("weights", "gains", "skips")),
    "skips_only": lambda d, w: dict(skips=[None] + [0.5] * (len(w) - 1), train=("skips",)),
}


def build(key, depth, structure, out_dim=None, P=7, d=4, width=4):
    kn, kx, ky = jax.random.split(key, 3)
    widths = (width,) * depth
    kw = structure(d, widths) if callable(structure) else dict(structure)
    net = gf.ReLUNet.init(kn, d, widths, out_dim=out_dim, **kw)
    X = jax.random.normal(kx, (P, d))
    y = jax.random.normal(ky, (P,) if out_dim is None else (P, out_dim))
    return net, X, y


def plain_forward(net, X):
    """`h = g s (W ⊙ M) z + α z`, written here independently of gramflow; returns (f, H)."""
    z, hs = X, []
    for l, W in enumerate(net.weights):
        if net.masks is not None and net.masks[l] is not None:
            W = jnp.where(net.masks[l].array, W, 0.0)
        h = net.scales[l] * jnp.einsum("pi,ni->pn", z, W)
        if net.gains is not None:
            h = net.gains[l] * h
        if net.skips is not None and net.skips[l] is not None:
            h = h + net.skips[l] * z
        hs.append(h)
        z = jnp.where(h > 0, h, 0.0)
    return net.scales[-1] * jnp.einsum("pn,n...->p...", z, net.readout), hs


def flow_direction(net, X, y):
    """`(H, dH/dt)` under gradient flow over the trained parameters, by jax.grad + jax.jvp."""
    params, rest = eqx.partition(net, gf.model.network.trainable(net))

    def H_of(p):
        return plain_forward(eqx.combine(p, rest), X)[1]

    def loss(p):
        return 0.5 * jnp.sum((plain_forward(eqx.combine(p, rest), X)[0] - y) ** 2)

    g = jax.grad(loss)(params)
    return jax.jvp(H_of, (params,), (jax.tree.map(jnp.negative, g),))


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-300))


def same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# -- the materialized hierarchy and the closures, every structure --------------------------------

# (masks, gains and skips one by one: test_structure.py; here dense and the layer that trains
# nothing, at depth 3 where every transport term exists)
@pytest.mark.parametrize("name", ["dense", "skips_only"])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_hierarchy_velocities_match_autodiff(getkey, name, out_dim):
    depth = 3
    net, X, y = build(getkey(), depth, STRUCTURES[name], out_dim)
    _, dH_ref = flow_direction(net, X, y)
    hv = gf.hierarchy_velocities(net, X, y)
    v = gf.velocities(net, X, y)
    for l in range(depth):
        assert rel(hv.H[l], dH_ref[l]) <= 1e-10
        assert rel(v.H[l], dH_ref[l]) <= 1e-10
    for a, b in zip(hv.B, v.B):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-10 * max(1.0, float(jnp.max(jnp.abs(b))))
    assert rel(hv.r, v.r) <= 1e-10


@pytest.mark.parametrize("name", STRUCTURES)
def test_truncated_rates_equal_hierarchy_with_dropped_terms_removed(getkey, name):
    depth = 3
    net, X, y = build(getkey(), depth, STRUCTURES[name], out_dim=2)
    exact = gf.velocities(net, X, y)
    previous = None
    for n in range(depth):
        v = gf.velocities(net, X, y, transport=n)
        hv = gf.hierarchy_velocities(net, X, y, transport=n)
        for a, b in zip((*v.H, *v.B), (*hv.H, *hv.B)):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-10 * max(1.0, float(jnp.max(jnp.abs(b))))
        if previous is not None and name != "skips_only":  # each n adds terms: n − 1 ≠ n
            assert rel(previous.H[-1], v.H[-1]) > 1e-8
        previous = v
    for a, b in zip((*previous.H, *previous.B), (*exact.H, *exact.B)):  # n = L − 1 is exact
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12 * max(1.0, float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("name,depth", [(n, d) for n in STRUCTURES for d in (1, 3)
                                        if (n, d) != ("skips_only", 1)])  # no layer to skip
def test_closure_step_is_euler_step_of_its_velocities(getkey, name, depth):
    """One step of `TruncatedTransport(n)` moves H by η × the truncated velocities (which the
    test above ties to autodiff); n = L − 1 is the exact flow's Euler step."""
    net, X, y = build(getkey(), depth, STRUCTURES[name])
    lr = 0.01
    for n in range(depth):
        traj = gf.simulate(net, X, y, steps=1, lr=lr, engine=gf.Collective(
            closure=gf.TruncatedTransport(n)))
        v = gf.velocities(net, X, y, transport=n)
        H0 = gf.collective_state(net, X, y).H
        for h, h0, dh in zip(traj.state.H, H0, v.H):
            assert float(jnp.max(jnp.abs(h - (h0 + lr * dh)))) <= 1e-12


@pytest.mark.parametrize("name", STRUCTURES)
def test_frozen_operators_closure_runs_for_every_structure(getkey, name):
    net, X, y = build(getkey(), 2, STRUCTURES[name])
    traj = gf.simulate(net, X, y, steps=3, lr=0.01, reference=gf.Weights(),
                       engine=gf.Collective(closure=gf.FrozenOperators()))
    err = traj.observables["closure_error"]
    assert float(err[0]) == 0.0 and bool(jnp.all(jnp.isfinite(err)))
    assert float(err[-1]) < 0.1  # a model: close to GD for a few small steps, not equal


# -- final network, resumable runs --------------------------------------------------------------

@pytest.mark.parametrize("name,depth", [(n, d) for n in STRUCTURES for d in (1, 3)
                                        if (n, d) != ("skips_only", 1)])
def test_collective_final_is_the_trained_network(getkey, name, depth):
    net, X, y = build(getkey(), depth, STRUCTURES[name], out_dim=2)
    w = gf.simulate(net, X, y, steps=15, lr=0.05)
    c = gf.simulate(net, X, y, steps=15, lr=0.05, engine=gf.Collective())
    assert isinstance(c.final, gf.ReLUNet)
    for a, b in zip(jax.tree.leaves(c.final), jax.tree.leaves(w.final)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12
    assert float(jnp.max(jnp.abs(c.final(X) - w.final(X)))) <= 1e-12


def test_collective_one_dense_layer_carries_no_weight_matrix(getkey):
    net, X, y = build(getkey(), 1, {})
    st = gf.simulate(net, X, y, steps=2, lr=0.05, engine=gf.Collective()).state
    assert st.weights[0].weight is None and st.coefficient.shape == (4, X.shape[0])


@pytest.mark.parametrize("engine", [
    gf.Weights(optax.adam(1e-2)), gf.Collective(), gf.Collective(closure=gf.TruncatedTransport(0))])
def test_resumed_run_equals_uninterrupted_bit_for_bit(getkey, engine):
    net, X, y = build(getkey(), 2, STRUCTURES["mask_gain_skip"])
    lr = None if not engine.needs_lr() else 0.05
    full = gf.simulate(net, X, y, steps=10, lr=lr, engine=engine)
    first = gf.simulate(net, X, y, steps=4, lr=lr, engine=engine)
    rest = gf.simulate(net, X, y, steps=6, lr=lr, engine=engine, state=first.state)
    assert same_tree(rest.state, full.state)
    assert same_tree(rest.final, full.final)
    assert np.array_equal(rest.loss, full.loss[4:])


# -- optimizers -------------------------------------------------------------------------------------

class CountingWeights(gf.Weights):
    """`Weights` that counts how often `simulate` traces it (once per compilation)."""

    def build(self, net, X, y, lr, *, continuous):
        TRACES.append(1)
        return super().build(net, X, y, lr, continuous=continuous)


TRACES = []


def test_new_optimizer_hyperparameters_do_not_recompile(getkey):
    net, X, y = build(getkey(), 2, {})
    TRACES.clear()
    runs = [gf.simulate(net, X, y, steps=3, engine=CountingWeights(optax.adam(lr)))
            for lr in (1e-2, 3e-3, 1e-3)]
    assert len(TRACES) == 1
    assert not np.array_equal(runs[0].loss, runs[1].loss)


def reference_loop(net, X, y, opt, steps):
    """optax by hand on an independent loss over the weights."""
    loss = lambda ws: 0.5 * jnp.sum((plain_forward(eqx.tree_at(  # noqa: E731
        lambda n: n.weights, net, ws), X)[0] - y) ** 2)

    @jax.jit  # one program (eagerly, every operation of the optimizer compiles on its own)
    def step(ws, state):
        value, g = jax.value_and_grad(loss)(ws)
        u, state = opt.update(g, state, ws, value=value, grad=g, value_fn=loss)
        return optax.apply_updates(ws, u), state

    ws, state = net.weights, opt.init(net.weights)
    for _ in range(steps):
        ws, state = step(ws, state)
    return ws


@pytest.mark.parametrize("make", [
    lambda: optax.adam(1e-2),
    lambda: optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=1)),
    lambda: optax.lbfgs(),
])
def test_optimizers_with_extra_arguments(getkey, make):
    net, X, y = build(getkey(), 2, {})
    traj = gf.simulate(net, X, y, steps=5, engine=gf.Weights(make()))
    ref = reference_loop(net, X, y, make(), 5)
    for a, b in zip(traj.final.weights, ref):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-10


def test_lr_with_optimizer_is_an_error(getkey):
    net, X, y = build(getkey(), 1, {})
    with pytest.raises(ValueError, match="optimizer"):
        gf.simulate(net, X, y, steps=2, lr=0.1, engine=gf.Weights(optax.sgd(0.1)))
    with pytest.raises(TypeError, match="engine object"):
        gf.simulate(net, X, y, steps=2, lr=0.1, engine="collective")
    with pytest.raises(ValueError, match="transport"):
        gf.TruncatedTransport(-1)


def test_flow_defaults_follow_the_dtype():
    c64, c32 = gf.default_controller(jnp.float64), gf.default_controller(jnp.float32)
    assert c32.rtol > 100 * c64.rtol and c32.atol > 100 * c64.atol


def test_state_of_another_run_is_refused(getkey):
    net, X, y = build(getkey(), 2, {})
    other = gf.simulate(net, X, y, steps=2, lr=0.1, engine=gf.Collective())
    with pytest.raises(ValueError, match="`state` does not fit"):
        gf.simulate(net, X, y, steps=2, lr=0.1, state=other.state)


def test_an_engine_can_be_rebuilt_from_its_own_optimizer(getkey):
    net, X, y = build(getkey(), 1, {})
    first = gf.Weights(optax.adam(1e-2))
    again = gf.Weights(first.optimizer)  # already a pytree: kept as it is
    a = gf.simulate(net, X, y, steps=3, engine=first)
    b = gf.simulate(net, X, y, steps=3, engine=again)
    assert np.array_equal(a.loss, b.loss)


def test_observables_are_checked(getkey):
    net, X, y = build(getkey(), 1, {})
    run = lambda **kw: gf.simulate(net, X, y, steps=2, lr=0.1, **kw)  # noqa: E731
    for taken in ({"loss": lambda v: 7.0}, {"step": lambda v: 1.0},
                  [lambda v: 1.0, lambda v: 2.0]):  # two "<lambda>"
        with pytest.raises(ValueError, match="taken"):
            run(observables=taken)
    with pytest.raises(TypeError, match="numeric"):
        run(observables={"bad": lambda v: "text"})
    with pytest.raises(TypeError, match=r"Collective\(\)"):
        run(engine=gf.Collective)
    with pytest.raises(ValueError, match="own optimizer"):
        run(engine=gf.Collective(), reference=gf.Weights(optax.adam(1e-2)))
    assert float(run(observables={"h": lambda v: jnp.sum(v.H[0])}).loss[0]) > 0
