"""Mini-batch SGD (I10): every engine against an independent weight-space SGD loop, the
batch schedule, gradient noise, and spectators under SGD."""

import functools
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import net_f, plain_f, problem, rel_err

import gramflow as gf
from gramflow import Mask


@functools.partial(jax.jit, static_argnames="lr")
def _plain_sgd(weights, readout, scales, X, y, batches, lr):
    """SGD on the weights of the plain function, batch by batch; the full-set residual
    after every step."""

    def loss(ws, idx):
        f = plain_f(ws, readout, scales, X[idx])[0]
        return 0.5 * jnp.sum((f - y[idx]) ** 2)

    def step(ws, idx):
        g = jax.grad(loss)(ws, idx)
        ws = [w - lr * gw for w, gw in zip(ws, g)]
        return ws, plain_f(ws, readout, scales, X)[0] - y

    return jax.lax.scan(step, list(weights), batches)


@pytest.mark.parametrize("depth,out_dim", [(1, None), (2, 2), (3, None), (3, 2)])
def test_sgd_engines_equal_weight_space_sgd(getkey, depth, out_dim):
    """Collective SGD (E_l → m ⊙ E_l in I8) = weights-engine SGD = plain autodiff SGD with
    the same batches, ≤ 1e-10 at every one of 100 steps (the residual on all sites)."""
    net, X, y = problem(getkey(), depth, out_dim=out_dim, P=10)
    lr, steps = 0.05, 100
    batches = gf.batch_schedule(getkey(), 10, 3, steps)
    _, r_ref = _plain_sgd(net.weights, net.readout, net.scales, X, y, batches, lr)
    r0 = net_f(net, X) - y
    for engine in (gf.Weights(), gf.Collective()):
        traj = gf.simulate(net, X, y, lr=lr, batches=batches, engine=engine)
        assert traj.r.shape[0] == steps + 1
        assert rel_err(traj.r[0], r0) <= 1e-14
        errs = [rel_err(traj.r[i + 1], r_ref[i]) for i in range(steps)]
        assert max(errs) <= 1e-10, (type(engine).__name__, max(errs))
        # the loss records are the full-batch loss, not the batch's
        np.testing.assert_allclose(traj.loss, 0.5 * np.sum(np.asarray(traj.r) ** 2,
                                                            axis=tuple(range(1, traj.r.ndim))),
                                   rtol=1e-13)


def test_sgd_structured_collective_equals_weights(getkey):
    """A masked net training weights and gains: the collective SGD equals the weights
    engine's at every step, and the final networks agree."""
    kn, kx, ky, kb = (getkey() for _ in range(4))
    widths = (6, 6, 5)
    fan_in = (4, *widths[:-1])
    masks = [Mask.block_diagonal((n, m), 2) for n, m in zip(widths, fan_in)]
    net = gf.ReLUNet.init(kn, 4, widths, masks=masks, gains=1.1, skips=0.5,
                          train=("weights", "gains"))
    X = jax.random.normal(kx, (9, 4))
    y = jax.random.normal(ky, (9,))
    kw = dict(lr=0.04, steps=100, batch_size=4, key=kb, observables=("r",))
    w = gf.simulate(net, X, y, **kw)
    c = gf.simulate(net, X, y, engine=gf.Collective(), **kw)
    assert rel_err(c.r, w.r) <= 1e-10
    for a, b in zip(jax.tree.leaves(c.final), jax.tree.leaves(w.final)):
        assert rel_err(a, b) <= 1e-10
    assert rel_err(w.r[-1], w.final(X) - y) <= 1e-12


@pytest.mark.parametrize("engine", [gf.Weights(), gf.Collective(), gf.FrozenKernel()],
                         ids=["weights", "collective", "frozen"])
def test_full_batch_is_gradient_descent(getkey, engine):
    """Batch = P is gradient descent: bit for bit for the collective engine (m = 1), to
    rounding for the engines that visit the batch in its permuted order."""
    net, X, y = problem(getkey(), 2, out_dim=2, P=8)
    gd = gf.simulate(net, X, y, steps=20, lr=0.05, engine=engine)
    sgd = gf.simulate(net, X, y, steps=20, lr=0.05, engine=engine, batch_size=8,
                      key=getkey(), observables=("loss", "r"))
    if isinstance(engine, gf.Collective):
        np.testing.assert_array_equal(sgd.r, gd.r)
    assert rel_err(sgd.r, gd.r) <= 1e-13


def test_frozen_kernel_sgd_closed_form(getkey):
    """The frozen kernel under SGD: `r ← r − η K₀ (m ⊙ r)` and test outputs
    `f_s ← f_s − η K₀(X_s, X)(m ⊙ r)`, against the kernel from `jax.jacrev`."""
    net, X, y = problem(getkey(), 2, P=7)
    Xs = jax.random.normal(getkey(), (4, X.shape[1]))
    ys = jax.random.normal(getkey(), (4,))
    batches = gf.batch_schedule(getkey(), 7, 2, 30)
    lr = 0.1
    traj = gf.simulate(net, X, y, lr=lr, batches=batches, engine=gf.FrozenKernel(),
                       test=(Xs, ys), observables=("r", "test_output"))
    J = jax.jacrev(lambda ws: plain_f(ws, net.readout, net.scales, jnp.concatenate([X, Xs]))[0])(
        net.weights)
    J = jnp.concatenate([j.reshape(11, -1) for j in J], axis=1)
    K = J @ J.T
    r = net_f(net, X) - y
    fs = net_f(net, Xs)
    for n, idx in enumerate(np.asarray(batches)):
        m = np.zeros(7)
        np.add.at(m, idx, 1)
        r, fs = r - lr * K[:7, :7] @ (m * r), fs - lr * K[7:, :7] @ (m * r)
        assert rel_err(traj.r[n + 1], r) <= 1e-10
        assert rel_err(traj.observables["test_output"][n + 1], fs) <= 1e-10


@pytest.mark.parametrize("out_dim", [None, 2])
def test_spectators_under_sgd(getkey, out_dim):
    """Test sites under collective SGD (I9 with I10) equal a forward pass of the weights
    engine's network at every recorded step."""
    net, X, y = problem(getkey(), 3, out_dim=out_dim, P=8)
    Xs = jax.random.normal(getkey(), (5, X.shape[1]))
    ys = jax.random.normal(getkey(), (5,) if out_dim is None else (5, 2))
    kw = dict(lr=0.05, steps=40, batch_size=3, key=getkey(), test=(Xs, ys),
              observables=("test_output",), record_every=8)
    c = gf.simulate(net, X, y, engine=gf.Collective(), **kw)
    w = gf.simulate(net, X, y, **kw)
    assert rel_err(c.observables["test_output"], w.observables["test_output"]) <= 1e-10
    assert rel_err(c.observables["test_output"][-1], net_f(w.final, Xs)) <= 1e-12


def test_batch_schedule(getkey):
    """Reproducible from the key; no sample twice within an epoch; every sample once per
    epoch when B divides P; `batch_size, key` is exactly `batches=batch_schedule(...)`."""
    key = getkey()
    s = gf.batch_schedule(key, 12, 4, 10)
    assert s.shape == (10, 4) and s.dtype == jnp.int32
    np.testing.assert_array_equal(s, gf.batch_schedule(key, 12, 4, 10))
    assert not np.array_equal(s, gf.batch_schedule(getkey(), 12, 4, 10))
    for epoch in range(3):
        block = np.asarray(s[3 * epoch: 3 * epoch + 3]).ravel()
        if block.size == 12:
            assert sorted(block) == list(range(12))
    t = np.asarray(gf.batch_schedule(key, 10, 3, 9))  # 3 batches per epoch, 1 sample waits
    for epoch in range(3):
        block = t[3 * epoch: 3 * epoch + 3].ravel()
        assert len(set(block)) == 9
    epochs = [tuple(np.asarray(s[3 * e: 3 * e + 3]).ravel()) for e in range(3)]
    assert len(set(epochs)) == 3  # a fresh permutation each epoch
    # a prefix of a longer schedule is the shorter schedule
    np.testing.assert_array_equal(gf.batch_schedule(key, 10, 3, 4), t[:4])
    net, X, y = problem(getkey(), 1, P=12)
    a = gf.simulate(net, X, y, steps=10, lr=0.1, batch_size=4, key=key)
    b = gf.simulate(net, X, y, lr=0.1, batches=s)
    np.testing.assert_array_equal(a.r, b.r)
    # fewer steps than record_every: one record at the start, one at the end
    c = gf.simulate(net, X, y, steps=2, lr=0.1, batch_size=4, key=key, record_every=5)
    np.testing.assert_array_equal(c.r, a.r[np.array([0, 2])])


@pytest.mark.parametrize("engine", [gf.Weights(), gf.Collective()], ids=["weights", "collective"])
def test_sgd_resumes_bit_for_bit(getkey, engine):
    net, X, y = problem(getkey(), 2, P=9)
    s = gf.batch_schedule(getkey(), 9, 2, 30)
    whole = gf.simulate(net, X, y, lr=0.05, batches=s, engine=engine)
    first = gf.simulate(net, X, y, lr=0.05, batches=s[:12], engine=engine)
    rest = gf.simulate(net, X, y, lr=0.05, batches=s[12:], engine=engine, state=first.state)
    np.testing.assert_array_equal(rest.r, whole.r[12:])


def test_gradient_noise_by_enumeration(getkey):
    """`gradient_noise` = `[tr Cov g_b, ‖E g_b‖²]` over every batch of B of the P samples,
    enumerated, with per-sample gradients from `jax.jacrev` of the plain function."""
    P, B = 6, 2
    for out_dim in (None, 2):
        net, X, y = problem(getkey(), 2, out_dim=out_dim, P=P)

        def loss(ws, idx, net=net, X=X, y=y):
            f = plain_f(ws, net.readout, net.scales, X[np.asarray(idx)])[0]
            return 0.5 * jnp.sum((f - y[np.asarray(idx)]) ** 2)

        gs = []
        for b in itertools.combinations(range(P), B):
            g = jax.grad(loss)(list(net.weights), list(b))
            gs.append(np.concatenate([np.ravel(x) for x in g]))
        gs = np.stack(gs)
        mean = gs.mean(0)
        cov = np.mean(np.sum((gs - mean) ** 2, axis=1))
        traj = gf.simulate(net, X, y, steps=1, lr=1e-3, batch_size=B, key=getkey())
        noise = traj.observables["gradient_noise"][0]
        np.testing.assert_allclose(noise, [cov, mean @ mean], rtol=1e-11)
    full = gf.simulate(net, X, y, steps=1, lr=1e-3,
                       observables=(gf.GradientNoise(batch_size=P),))
    assert full.observables["gradient_noise"][0, 0] == 0.0


def test_sgd_float32(getkey):
    net, X, y = problem(getkey(), 2, dtype=jnp.float32, P=10)
    kw = dict(lr=0.05, steps=50, batch_size=4, key=getkey())
    w = gf.simulate(net, X, y, **kw)
    c = gf.simulate(net, X, y, engine=gf.Collective(), **kw)
    assert c.r.dtype == jnp.float32
    assert rel_err(c.r, w.r) <= 1e-4


def test_sgd_errors(getkey):
    net, X, y = problem(getkey(), 1, P=6)
    key = getkey()
    with pytest.raises(ValueError, match="needs a `key`"):
        gf.simulate(net, X, y, steps=3, lr=0.1, batch_size=2)
    with pytest.raises(ValueError, match="give `batch_size` too"):
        gf.simulate(net, X, y, steps=3, lr=0.1, key=key)
    with pytest.raises(ValueError, match="exceeds the number of samples"):
        gf.simulate(net, X, y, steps=3, lr=0.1, batch_size=7, key=key)
    with pytest.raises(ValueError, match="outside"):
        gf.simulate(net, X, y, lr=0.1, batches=np.array([[0, 6]]))
    with pytest.raises(ValueError, match="not both"):
        gf.simulate(net, X, y, lr=0.1, batches=np.array([[0, 1]]), batch_size=2, key=key)
    with pytest.raises(ValueError, match="rows but `steps`"):
        gf.simulate(net, X, y, steps=2, lr=0.1, batches=np.array([[0, 1]]))
    with pytest.raises(ValueError, match="int array"):
        gf.simulate(net, X, y, lr=0.1, batches=np.array([[0.0, 1.0]]))
    with pytest.raises(TypeError, match="typed PRNG key"):
        gf.batch_schedule(0, 6, 2, 3)
    with pytest.raises(ValueError, match="mini-batch"):
        gf.simulate(net, X, y, steps=3, lr=0.1, observables=("gradient_noise",))
    with pytest.raises(ValueError, match="outside"):
        gf.simulate(net, X, y, lr=0.1, batches=np.array([[0, -1]]))
    with pytest.raises(ValueError, match="non-empty"):
        gf.simulate(net, X, y, lr=0.1, batches=np.zeros((0, 2), int))
    with pytest.raises(ValueError, match="same length"):
        gf.simulate(net, X, y, lr=0.1, batches=[[0, 1], [2]])
    with pytest.raises(ValueError, match="one PRNG key"):
        gf.simulate(net, X, y, steps=3, lr=0.1, batch_size=2, key=jax.random.split(key))
    with pytest.raises(ValueError, match="at most P"):
        gf.simulate(net, X, y, steps=1, lr=0.1, observables=(gf.GradientNoise(batch_size=7),))
    first = gf.simulate(net, X, y, steps=2, lr=0.1, batch_size=2, key=key)
    with pytest.raises(ValueError, match="rest of its schedule"):
        gf.simulate(net, X, y, steps=2, lr=0.1, batch_size=2, key=key, state=first.state)
    # under jit an index out of range is caught at run time, not clamped or dropped
    bad = gf.batch_schedule(key, 6, 2, 3).at[1, 0].set(9)
    run = jax.jit(lambda b: gf.simulate(net, X, y, lr=0.1, batches=b).r)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(run(bad))


def test_closure_under_sgd_is_an_euler_step_of_the_batch_flow(getkey):
    """A closure keeping every term, one SGD step: `H_l' − H_l = η dH_l/dt` of the flow of the
    batch loss, `dH_l/dt` by `jax.jvp` of the plain network along `−∇L_b` (so the batch
    reaches the closure's step)."""
    net, X, y = problem(getkey(), 3, P=8)
    batch = np.array([1, 4, 6])
    lr = 0.05

    def batch_loss(ws):
        f = plain_f(ws, net.readout, net.scales, X[batch])[0]
        return 0.5 * jnp.sum((f - y[batch]) ** 2)

    ws = list(net.weights)
    direction = [-g for g in jax.grad(batch_loss)(ws)]
    _, dH = jax.jvp(lambda w: plain_f(w, net.readout, net.scales, X)[1], (ws,), (direction,))
    closure = gf.Collective(closure=gf.TruncatedTransport(2))
    traj = gf.simulate(net, X, y, lr=lr, batches=batch[None], engine=closure,
                       observables=("loss",))
    H0 = plain_f(ws, net.readout, net.scales, X)[1]
    for l in range(3):
        assert rel_err(traj.state.H[l] - H0[l], lr * dH[l]) <= 1e-10, l


def test_grad_and_vmap_through_sgd(getkey):
    """`jax.grad` of the final loss of an SGD run with respect to lr against a central
    difference; `jax.vmap` over keys equals a loop."""
    net, X, y = problem(getkey(), 2, P=8)
    s = gf.batch_schedule(getkey(), 8, 3, 20)
    for engine in (gf.Weights(), gf.Collective()):
        def final(lr, engine=engine):
            return gf.simulate(net, X, y, lr=lr, batches=s, engine=engine,
                               observables=("loss",)).loss[-1]

        h = 1e-6
        fd = (final(0.05 + h) - final(0.05 - h)) / (2 * h)
        np.testing.assert_allclose(jax.grad(final)(0.05), fd, rtol=1e-6)
    keys = jax.random.split(getkey(), 3)
    run = lambda k: gf.simulate(net, X, y, steps=10, lr=0.05, batch_size=3, key=k,  # noqa: E731
                                observables=("loss",)).loss
    np.testing.assert_array_equal(jax.vmap(run)(keys), np.stack([run(k) for k in keys]))


def test_gradient_noise_structured_collective(getkey):
    """`gradient_noise` of a structured net (mask, trained gains and skips, vector output)
    under the collective engine, by enumeration of every batch with `jax.grad` of the
    weights engine's batch loss."""
    P, B = 5, 2
    kn, kx, ky = getkey(), getkey(), getkey()
    masks = [None, Mask.block_diagonal((6, 6), 2)]
    net = gf.ReLUNet.init(kn, 3, (6, 6), out_dim=2, masks=masks, gains=1.1, skips=0.5,
                          train=("weights", "gains", "skips"))
    X = jax.random.normal(kx, (P, 3))
    y = jax.random.normal(ky, (P, 2))
    diff, rest = eqx.partition(net, gf.trainable(net))

    def loss(d, idx):
        f = eqx.combine(d, rest)(X[np.asarray(idx)])
        return 0.5 * jnp.sum((f - y[np.asarray(idx)]) ** 2)

    gs = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        jax.grad(loss)(diff, list(b)))]) for b in itertools.combinations(range(P), B)])
    mean = gs.mean(0)
    cov = np.mean(np.sum((gs - mean) ** 2, axis=1))
    traj = gf.simulate(net, X, y, steps=1, lr=1e-3, batch_size=B, key=getkey(),
                       engine=gf.Collective())
    np.testing.assert_allclose(traj.observables["gradient_noise"][0], [cov, mean @ mean],
                               rtol=1e-11)
