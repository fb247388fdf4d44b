"""Balance laws: conserved along gradient flow, broken by the fixed readout and by GD steps."""

import jax
import jax.numpy as jnp
import numpy as np

import gramflow as gf


def test_balance_is_conserved_along_gradient_flow():
    kd, kn = jax.random.split(jax.random.key(1))
    X, y = gf.teacher_student(kd, samples=8, in_dim=3)
    net = gf.ReLUNet.init(kn, 3, (12, 10, 8))
    traj = gf.flow(net, X, y, t1=0.3, ts=jnp.array([0.3]), rtol=1e-12, atol=1e-12,
                   observables=("loss",))
    before, after = gf.diagnostics.balance(net), gf.diagnostics.balance(traj.final)
    assert len(before) == 2 and [b.shape for b in before] == [(12,), (10,)]
    for b0, b1 in zip(before, after):
        assert float(jnp.abs(b1 - b0).max()) <= 1e-8 * (1 + float(jnp.abs(b0).max()))
    # The weights did move, and the last hidden layer (fixed readout) has no balance law:
    moved = [float(jnp.abs(w1 - w0).max()) for w0, w1 in zip(net.weights, traj.final.weights)]
    assert min(moved) > 1e-4
    last_in = [jnp.sum(n.weights[-1] ** 2, axis=1) for n in (net, traj.final)]
    assert float(jnp.abs(last_in[1] - last_in[0]).max()) > 1e-6
    # Discrete gradient descent breaks the law at O(η²) per step.
    gd = gf.simulate(net, X, y, steps=30, lr=0.01, observables=("loss",))
    drift = max(float(jnp.abs(a - b).max()) for a, b in zip(gf.diagnostics.balance(gd.final), before))
    assert drift > 1e-10
    assert gf.diagnostics.balance(gf.ReLUNet.init(kn, 3, (5,))) == ()
    assert np.isfinite(drift)


def test_eigenvalue_sensitivity_matches_finite_differences():
    kd, kn, kv = jax.random.split(jax.random.key(3), 3)
    X, _ = gf.teacher_student(kd, samples=9, in_dim=3, out_dim=None)
    for out_dim in (None, 2):
        net = gf.ReLUNet.init(kn, 3, (8, 6), out_dim=out_dim)
        sens = gf.diagnostics.eigenvalue_sensitivity(net, X, m=2)
        assert sens.values.shape == (3, 2) and sens.inputs.shape == (3, 2, 9, 3)
        dW = tuple(jax.random.normal(jax.random.fold_in(kv, i), w.shape)
                   for i, w in enumerate(net.weights))
        dX = jax.random.normal(kv, X.shape)
        eps = 1e-6

        def values(scale):
            moved = gf.ReLUNet(tuple(w + scale * d for w, d in zip(net.weights, dW)),
                               net.readout, net.scales)
            return gf.diagnostics.eigenvalue_sensitivity(moved, X + scale * dX, m=2).values

        fd = (values(eps) - values(-eps)) / (2 * eps)
        ad = sum(jnp.einsum("abij,ij->ab", g, d) for g, d in zip(sens.weights, dW))
        ad = ad + jnp.einsum("abpd,pd->ab", sens.inputs, dX)
        assert float(jnp.abs(ad - fd).max()) <= 1e-6 * (1 + float(jnp.abs(fd).max()))


def test_condition_number_observable():
    kd, kn = jax.random.split(jax.random.key(4))
    X, y = gf.teacher_student(kd, samples=8, in_dim=3)
    net = gf.ReLUNet.init(kn, 3, (16, 16))
    traj = gf.simulate(net, X, y, steps=10, lr=0.05, record_every=10,
                       observables=("condition_number",))
    ev = jnp.linalg.eigvalsh(gf.collective_kernel(net, X))
    assert abs(float(traj.observables["condition_number"][0]) - float(ev[-1] / ev[0])) <= 1e-8 * float(ev[-1] / ev[0])
