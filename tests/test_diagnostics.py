"""Balance laws: conserved along gradient flow, broken by the fixed readout and by GD steps."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import pid

import gramflow as gf


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


def _hessian_eigs(loss, params):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return jnp.linalg.eigvalsh(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat))


def test_fixed_point_interpolating_with_a_symmetry_direction():
    # f = w2 relu(w1 x) on x > 0: fixed points w1 w2 = 2, where the Jacobian of the velocity
    # field, −∇²L = −Σx² [[w2², w1w2], [w1w2, w1²]], has eigenvalues −Σx²(w1² + w2²) and 0
    # (the rescaling symmetry).
    net = gf.ReLUNet((jnp.array([[1.0]]), jnp.array([[1.5]])), jnp.array([1.0]), jnp.ones(3))
    X = jnp.array([[1.0], [2.0]])
    fp = gf.diagnostics.fixed_point(net, X, 2.0 * X[:, 0])
    w1, w2 = (float(w[0, 0]) for w in fp.net.weights)
    assert bool(fp.converged) and bool(fp.interpolating)
    assert abs(w1 * w2 - 2.0) <= 1e-10
    np.testing.assert_allclose(fp.eigenvalues, [0.0, -5.0 * (w1**2 + w2**2)], atol=1e-9)
    assert fp.stability == "marginal" and int(fp.n_zero) == 1
    assert "interpolating fixed point, marginal" in str(fp)


def test_fixed_point_non_interpolating_stable():
    # Two copies of x = 1 with targets 2 and 0: the best f = relu(w) is 1, r = (−1, 1) ≠ 0
    # with K r = 0; the velocity Jacobian is −Σx² = −2.
    net = gf.ReLUNet((jnp.array([[0.3]]),), jnp.array([1.0]), jnp.ones(2))
    X, y = jnp.array([[1.0], [1.0]]), jnp.array([2.0, 0.0])
    fp = gf.diagnostics.fixed_point(net, X, y)
    assert bool(fp.converged) and not bool(fp.interpolating)
    np.testing.assert_allclose(float(fp.net.weights[0][0, 0]), 1.0, atol=1e-10)
    np.testing.assert_allclose(fp.r, [-1.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(fp.eigenvalues, [-2.0], atol=1e-10)
    assert fp.stability == "stable"
    # Minimizing the loss instead finds the same attractor; a search cut short says so.
    by_loss = gf.diagnostics.fixed_point(net, X, y, objective="loss")
    np.testing.assert_allclose(float(by_loss.net.weights[0][0, 0]), 1.0, atol=1e-10)
    cut = gf.diagnostics.fixed_point(net, X, y, max_steps=0)
    assert cut.stability == "not converged" and str(cut).startswith("no fixed point reached")
    with pytest.raises(ValueError, match="objective"):
        gf.diagnostics.fixed_point(net, X, y, objective="energy")


def test_fixed_point_saddle_found_and_classified():
    # A hand-made saddle with every unit active: W2ᵀa = 0 silences the output (f = 0,
    # r = −y) and W1 (Xᵀr) = 0 silences the gradient of W2, so ∇L = 0; the bilinear
    # coupling of W1 and W2 through Σ r ∇²f gives directions of growth.
    W1, W2, a = jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.array([1.0, -1.0])
    X, y = jnp.array([[1.0, 2.0], [2.0, 1.0]]), jnp.array([-1.0, 1.0])
    star = gf.ReLUNet((W1, W2), a, jnp.ones(3))
    for g in gf.pullback_gradients(star, X, y):
        assert float(jnp.abs(g).max()) == 0.0
    fp = gf.diagnostics.fixed_point(star, X, y)
    assert int(fp.steps) == 0 and fp.stability == "unstable" and not bool(fp.interpolating)

    def loss(ws):  # an independent plain function: jax.hessian gives the reference spectrum
        f = a @ jax.nn.relu(ws[1] @ jax.nn.relu(ws[0] @ X.T))
        return 0.5 * jnp.sum((f - y) ** 2)

    ref = -_hessian_eigs(loss, (W1, W2))  # descending, like fp.eigenvalues
    np.testing.assert_allclose(fp.eigenvalues, ref, atol=1e-10)
    assert int(fp.n_unstable) == int(jnp.sum(ref > 1e-8)) >= 1
    # From a perturbed start the finder returns to the saddle family (f = 0, r = −y).
    k1, k2 = jax.random.split(jax.random.key(0))
    near = gf.ReLUNet((W1 + 0.05 * jax.random.normal(k1, (2, 2)),
                       W2 + 0.05 * jax.random.normal(k2, (2, 2))), a, jnp.ones(3))
    found = gf.diagnostics.fixed_point(near, X, y)
    assert bool(found.converged) and found.stability == "unstable"
    np.testing.assert_allclose(found.r, -y, atol=1e-8)


def test_eigenvalue_sensitivity_to_structure_parameters():
    kd, kn, kv = jax.random.split(jax.random.key(5), 3)
    X, _ = gf.teacher_student(kd, samples=9, in_dim=4)
    mask = gf.Mask.block_diagonal((6, 6), 2)
    net = gf.ReLUNet.init(kn, 4, (6, 6), masks=[None, mask], gains=1.1, skips=[None, 0.4],
                          train=("weights", "gains", "skips"))
    sens = gf.diagnostics.eigenvalue_sensitivity(net, X, m=2)
    assert sens.gains.shape == (3, 2, 2) and sens.skips[0] is None
    dg, da = jax.random.normal(kv, (2,)), 0.7
    eps = 1e-6

    def values(scale):
        moved = eqx.tree_at(lambda n: (n.gains, n.skips[1]), net,
                            (net.gains + scale * dg, net.skips[1] + scale * da))
        return gf.diagnostics.eigenvalue_sensitivity(moved, X, m=2).values

    fd = (values(eps) - values(-eps)) / (2 * eps)
    ad = jnp.einsum("abl,l->ab", sens.gains, dg) + sens.skips[1] * da
    assert float(jnp.abs(ad - fd).max()) <= 1e-6 * (1 + float(jnp.abs(fd).max()))


def test_sharpness_matches_dense_hessian():
    kd, kn = jax.random.split(jax.random.key(6))
    X, y = gf.teacher_student(kd, samples=10, in_dim=3)
    net = gf.ReLUNet.init(kn, 3, (16, 16), gains=1.0)
    sh = gf.diagnostics.sharpness(net, X, y, k=2, iters=12)
    flat, unravel = jax.flatten_util.ravel_pytree((net.weights, net.gains))

    def loss(v):
        ws, g = unravel(v)
        z = X
        for l, W in enumerate(ws):
            z = jax.nn.relu(g[l] * net.scales[l] * z @ W.T)
        return 0.5 * jnp.sum((net.scales[-1] * z @ net.readout - y) ** 2)

    ref = jnp.linalg.eigvalsh(jax.jit(jax.hessian(loss))(flat))[::-1][:2]  # one program
    assert sh.values.shape == (2,) and float(jnp.max(sh.residuals)) < 1e-6
    np.testing.assert_allclose(sh.values, ref, rtol=1e-8)


def test_robustness_scales_linearly_and_keeps_masks():
    kd, kn = jax.random.split(jax.random.key(7))
    X, y = gf.teacher_student(kd, samples=8, in_dim=4)
    net = gf.ReLUNet.init(kn, 4, (8, 8), masks=[None, gf.Mask.block_diagonal((8, 8), 4)])
    # eps as an array: the three sizes share one compiled program (a float is static).
    small, half = (gf.diagnostics.robustness(net, X, y, eps=jnp.asarray(e), n=4)
                   for e in (1e-6, 5e-7))
    for name in ("input_output", "weight_output", "input_kernel", "weight_kernel"):
        ratio = np.asarray(getattr(small, name)) / np.asarray(getattr(half, name))
        np.testing.assert_allclose(ratio, 2.0, rtol=1e-3)  # first order in eps
    big = gf.diagnostics.robustness(net, X, y, eps=jnp.asarray(0.1), n=4)
    assert all(v > 0 for v in big.summary().values())
    with pytest.raises(ValueError, match="eps"):
        gf.diagnostics.robustness(net, X, y, eps=0.0)


def test_depth_scaling_records_spectra_and_training():
    kd = jax.random.key(8)
    X, y = gf.teacher_student(kd, samples=8, in_dim=3)
    ds = gf.diagnostics.depth_scaling(X, y, depths=(1, 3), width=8, seeds=(0, 1), steps=30,
                                      top_m=3, progress=False)
    assert ds.kernel_top.shape == (2, 2, 3) and ds.loss.shape == (2, 2, 31)
    net = gf.ReLUNet.init(jax.random.key(1), 3, (8, 8, 8))
    ev = jnp.linalg.eigvalsh(gf.collective_kernel(net, X))[::-1]
    np.testing.assert_allclose(ds.kernel_top[1, 1], ev[:3], rtol=1e-10)
    np.testing.assert_allclose(ds.lrs[1], 1.0 / float(jnp.mean(ds.kernel_top[1, :, 0])), rtol=1e-12)
    t = gf.simulate(net, X, y, steps=30, lr=float(ds.lrs[1]))
    np.testing.assert_allclose(ds.loss[1, 1], t.loss, rtol=1e-10)
    assert np.isnan(ds.kernel_share[0, 0, 1]) and abs(float(np.nansum(ds.kernel_share[1, 0])) - 1) < 1e-12


def test_balance_is_conserved_along_gradient_flow_and_tracked():
    kd, kn = jax.random.split(jax.random.key(9))
    X, y = gf.teacher_student(kd, samples=8, in_dim=4)
    ts = jnp.linspace(0.0, 0.3, 7)
    plain = gf.ReLUNet.init(kn, 4, (10, 8, 6))
    mask = gf.Mask.block_diagonal((8, 10), 2)
    structured = gf.ReLUNet.init(kn, 4, (10, 8, 6), masks=[None, mask, None], gains=1.0)
    for net, engine in [(plain, gf.Weights()), (structured, gf.Collective())]:
        traj = gf.flow(net, X, y, t1=0.3, ts=ts, engine=engine,
                       stepsize_controller=pid(1e-12, 1e-12), observables=("balance_drift",))
        drift = np.asarray(traj.observables["balance_drift"])
        assert drift.shape == (7, 3) and np.isnan(drift[:, 2]).all()
        assert np.nanmax(drift) <= 1e-8 and float(traj.loss[-1]) < float(traj.loss[0])
        # Gradient descent breaks the laws at O(η²) per step, and the record shows it.
        gd = gf.simulate(net, X, y, steps=30, lr=0.05, observables=("balance_drift",))
        assert float(np.nanmax(np.asarray(gd.observables["balance_drift"][-1]))) > 1e-9
        if net is plain:
            # The laws themselves, from the networks: conserved along the flow, though the
            # weights moved; the last hidden layer (fixed readout) has no law; GD drifts.
            before, after = gf.diagnostics.balance(net), gf.diagnostics.balance(traj.final)
            assert len(before) == 2 and [b.shape for b in before] == [(10,), (8,)]
            for b0, b1 in zip(before, after):
                assert float(jnp.abs(b1 - b0).max()) <= 1e-8 * (1 + float(jnp.abs(b0).max()))
            moved = [float(jnp.abs(w1 - w0).max())
                     for w0, w1 in zip(net.weights, traj.final.weights)]
            assert min(moved) > 1e-4
            last_in = [jnp.sum(n.weights[-1] ** 2, axis=1) for n in (net, traj.final)]
            assert float(jnp.abs(last_in[1] - last_in[0]).max()) > 1e-6
            gd_drift = max(float(jnp.abs(a - b).max())
                           for a, b in zip(gf.diagnostics.balance(gd.final), before))
            assert np.isfinite(gd_drift) and gd_drift > 1e-10
    assert gf.diagnostics.balance(gf.ReLUNet.init(kn, 4, (5,))) == ()
    # The collective engine of a plain network no longer lacks W_1 (it rebuilds it from its
    # fields), so it records the same balance drift as the weights engine; only the frozen
    # kernel, which carries no network, cannot.
    w = gf.simulate(plain, X, y, steps=30, lr=0.05, observables=("balance_drift",))
    c = gf.simulate(plain, X, y, steps=30, lr=0.05, engine=gf.Collective(),
                    observables=("balance_drift",))
    np.testing.assert_allclose(c.observables["balance_drift"], w.observables["balance_drift"],
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="carries only the residual"):
        gf.simulate(plain, X, y, steps=2, lr=0.1, engine=gf.FrozenKernel(),
                    observables=("balance_drift",))
