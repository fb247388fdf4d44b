"""simulate and flow: engines against an independent gradient-descent loop, closed forms,
finite differences; observables; divergence; bad configurations."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_rel_close, pid, plain_f, problem, rel_err

import gramflow as gf


def _lam_max(net, X):
    K = gf.collective_kernel(net, X)
    if K.ndim == 4:
        P, k = K.shape[0], K.shape[2]
        K = K.transpose(0, 2, 1, 3).reshape(P * k, P * k)
    return float(jnp.linalg.eigvalsh(K)[-1])


@jax.jit  # one program per shape, shared by every test and step size
def _gd_step(ws, readout, scales, X, y, lr):
    loss = lambda ws: 0.5 * jnp.sum((plain_f(ws, readout, scales, X)[0] - y) ** 2)  # noqa: E731
    return jax.tree.map(lambda w, g: w - lr * g, ws, jax.grad(loss)(ws)), plain_f(ws, readout, scales, X)[0] - y


def _gd_loop(net, X, y, lr, steps):
    """Plain gradient descent on the weights with jax.grad, independent of gramflow."""
    ws, rs = net.weights, []
    for _ in range(steps):
        ws, r = _gd_step(ws, net.readout, net.scales, X, y, lr)
        rs.append(r)
    rs.append(plain_f(ws, net.readout, net.scales, X)[0] - y)
    return ws, jnp.stack(rs)


def _task(key, depth, widths, *, out_dim=None, P=12, d=5):
    kd, kn = jax.random.split(key)
    X, y = gf.teacher_student(kd, samples=P, in_dim=d, out_dim=out_dim)
    return gf.ReLUNet.init(kn, d, widths, out_dim=out_dim), X, y


@pytest.mark.parametrize("out_dim", [None, 2])
def test_weights_engine_matches_plain_gd(getkey, out_dim):
    net, X, y = problem(getkey(), 2, out_dim=out_dim, P=8)
    lr = 0.5 / _lam_max(net, X)
    traj = gf.simulate(net, X, y, steps=40, lr=lr)
    ws, rs = _gd_loop(net, X, y, lr, 40)
    assert_rel_close(traj.r, rs, jnp.float64, what="r")
    assert_rel_close(traj.final.weights, ws, jnp.float64, what="W")
    assert isinstance(traj.final, gf.ReLUNet) and isinstance(traj.engine, gf.Weights)
    assert isinstance(traj.state, gf.WeightsState)
    assert_rel_close(traj.state.params.weights, ws, jnp.float64, what="state W")
    assert traj.step.tolist() == list(range(41)) and traj.t is None
    assert_rel_close(traj.loss, 0.5 * jnp.sum(rs.reshape(41, -1) ** 2, 1), jnp.float64)


@pytest.mark.parametrize("factor", [0.3, 1.0, 1.9])
@pytest.mark.parametrize("out_dim", [None, 3])
def test_one_layer_collective_equals_weights_any_lr(getkey, factor, out_dim):
    """(I3): the weight-free map reproduces gradient descent exactly, for any η."""
    net, X, y = _task(getkey(), 1, (24,), out_dim=out_dim)
    lr = factor / _lam_max(net, X)
    traj = gf.simulate(net, X, y, steps=500, lr=lr, engine=gf.Collective(), record_every=100,
                       reference=gf.Weights())
    _, rs = _gd_loop(net, X, y, lr, 500)
    assert rel_err(traj.r, rs[::100]) <= 1e-10
    # closure_error is relative to ‖r_ref(t)‖, which falls by up to 1e8 in 500 steps; both
    # runs are exact up to rounding, which does not fall with it: judged against ‖r_ref(0)‖
    norms = jnp.linalg.norm(traj.r.reshape(traj.r.shape[0], -1), axis=1)
    assert float(jnp.max(traj.observables["closure_error"] * norms / norms[0])) <= 1e-12
    assert float(traj.observables["field_error"].max()) <= 1e-10


@pytest.mark.parametrize("P,d", [(12, 5), (6, 9)])  # C applied as X(Xᵀ·), and as a formed C
def test_one_layer_collective_carries_no_weights(getkey, P, d):
    net, X, y = _task(getkey(), 1, (7,), P=P, d=d)
    traj = gf.simulate(net, X, y, steps=5, lr=0.1, engine=gf.Collective())
    state = traj.state
    assert isinstance(state, gf.FieldState)
    assert state.weights == (gf.LayerParams(),) and state.B == ()  # layer 1 keeps no W_1
    shapes = [leaf.shape for leaf in jax.tree.leaves(state)]
    # H_1, r and the coefficient A (N_1, P) of W_1(t) = W_1(0) + A X: no (7, d) weight matrix
    # anywhere (the shapes differ as d ≠ P in both cases).
    assert shapes == [(P, 7), (P,), (7, P)] and (7, d) not in shapes
    ws, rs = _gd_loop(net, X, y, 0.1, 5)
    assert rel_err(traj.r, rs) <= 1e-12
    # The network at the end, W_1 rebuilt from its memory of the fields, is gradient descent's.
    assert isinstance(traj.final, gf.ReLUNet)
    assert rel_err(traj.final.weights[0], ws[0]) <= 1e-12


# Two shapes, P below and above the widths (which side of a Gram product is contracted first
# depends on P and the widths (I6), not on the output dimension): scalar and vector output at
# the first, the vector output at the second.
@pytest.mark.parametrize("P,widths,out_dim", [(12, (16, 12, 10), None), (12, (16, 12, 10), 2),
                                              (40, (8, 6, 5), 2)])
def test_three_layer_collective_equals_weights(getkey, out_dim, P, widths):
    """(I8): the exact discrete maps in field form reproduce gradient descent."""
    net, X, y = _task(getkey(), 3, widths, out_dim=out_dim, P=P)
    lr = 0.9 / _lam_max(net, X)
    traj = gf.simulate(net, X, y, steps=500, lr=lr, engine=gf.Collective(), record_every=50,
                       reference=gf.Weights())
    ws, rs = _gd_loop(net, X, y, lr, 500)
    assert rel_err(traj.r, rs[::50]) <= 1e-8
    assert float(traj.observables["field_error"].max()) <= 1e-8
    carried = traj.state.weights
    assert carried[0].weight is None  # W_1 is not carried (I3, I8) ...
    assert_rel_close(tuple(p.weight for p in carried[1:]), ws[1:], jnp.float64,
                     what="W_2..W_L")
    # ... but rebuilt from its coefficient for the final network.
    assert_rel_close(traj.final.weights, ws, jnp.float64, what="W_1..W_L")
    assert float(traj.loss[-1]) < 0.5 * float(traj.loss[0])  # it trained


def test_frozen_kernel_closed_forms(getkey):
    net, X, y = problem(getkey(), 2, out_dim=2, P=7)
    K = gf.collective_kernel(net, X)
    Kf = K.transpose(0, 2, 1, 3).reshape(14, 14)
    r0 = (net(X) - y).reshape(-1)
    lr = 0.5 / _lam_max(net, X)
    traj = gf.simulate(net, X, y, steps=30, lr=lr, engine=gf.FrozenKernel(), record_every=10)
    A = jnp.eye(14) - lr * Kf
    expected = jnp.stack([jnp.linalg.matrix_power(A, n) @ r0 for n in (0, 10, 20, 30)])
    assert rel_err(traj.r.reshape(4, -1), expected) <= 1e-12
    ts = jnp.array([0.0, 0.5, 2.0])
    ft = gf.flow(net, X, y, t1=2.0, ts=ts, lr=lr, engine=gf.FrozenKernel())
    expected = jnp.stack([jax.scipy.linalg.expm(-lr * t * Kf) @ r0 for t in ts])
    assert rel_err(ft.r.reshape(3, -1), expected) <= 1e-12


def test_frozen_kernel_error_decreases_with_width(getkey):
    """The lazy (NTK) limit: freezing K errs less as the width grows."""
    kd = getkey()
    X, y = gf.teacher_student(kd, samples=16, in_dim=5)
    errors = []
    for width in (16, 128, 1024):
        errs = []
        for seed in range(3):
            net = gf.ReLUNet.init(jax.random.key(seed), 5, (width, width))
            traj = gf.simulate(net, X, y, steps=100, lr=0.05, engine=gf.FrozenKernel(),
                               reference=gf.Weights(), record_every=100)
            errs.append(float(traj.observables["closure_error"][-1]))
        errors.append(np.mean(errs))
    assert errors[0] > errors[1] > errors[2], errors


def test_flow_one_layer_collective_equals_weights(getkey):
    net, X, y = _task(jax.random.key(1), 1, (32,), P=8, d=3)  # a seed without sliding
    ts = jnp.linspace(0.0, 1.0, 6)
    kw = dict(t1=1.0, ts=ts, stepsize_controller=pid(1e-12, 1e-12))
    w = gf.flow(net, X, y, engine=gf.Weights(), **kw)
    # The collective engine's residual against the weights engine's own solve (the collective
    # flow without a reference: test_gradients_match_finite_differences[flow-collective]).
    both = gf.flow(net, X, y, engine=gf.Collective(), reference=gf.Weights(), **kw)
    assert rel_err(both.r, w.r) <= 1e-8
    assert both.t.tolist() == ts.tolist() and both.step is None
    assert float(both.observables["closure_error"].max()) <= 1e-12  # one solve: a linear image
    assert float(w.loss[-1]) < float(w.loss[0])


def test_flow_deep_collective_equals_weights_without_sliding(getkey):
    net, X, y = _task(jax.random.key(3), 3, (16, 12, 10), P=8, d=3)  # a seed without sliding
    kw = dict(t1=0.3, ts=jnp.linspace(0.0, 0.3, 4), stepsize_controller=pid(1e-11, 1e-12))
    both = gf.flow(net, X, y, engine=gf.Collective(), reference=gf.Weights(), **kw)
    assert float(both.observables["closure_error"].max()) <= 1e-8
    assert float(both.observables["field_error"].max()) <= 1e-8


def test_flow_matches_small_step_gd(getkey):
    """Gradient descent with step η/n over n·T steps approaches the flow to time T as n grows."""
    net, X, y = _task(jax.random.key(1), 1, (32,), P=8, d=3)
    ft = gf.flow(net, X, y, t1=0.5, ts=jnp.array([0.5]), stepsize_controller=pid(1e-12, 1e-12))
    errs = []
    for n in (50, 100):
        traj = gf.simulate(net, X, y, steps=n, lr=0.5 / n, record_every=n)
        errs.append(rel_err(traj.r[-1], ft.r[-1]))
    assert errs[1] < 0.6 * errs[0] and errs[1] < 1e-2  # first order in the step


def test_optax_optimizer(getkey):
    net, X, y = problem(getkey(), 2, P=8)
    opt = optax.adam(1e-2)
    traj = gf.simulate(net, X, y, steps=20, engine=gf.Weights(optimizer=opt), record_every=20)
    ws, state = net.weights, opt.init(net.weights)
    loss = lambda ws: 0.5 * jnp.sum((plain_f(ws, net.readout, net.scales, X)[0] - y) ** 2)  # noqa: E731
    for _ in range(20):
        updates, state = opt.update(jax.grad(loss)(ws), state, ws)
        ws = optax.apply_updates(ws, updates)
    assert_rel_close(traj.final.weights, ws, jnp.float64, what="adam")


@pytest.mark.parametrize("engine", [gf.Weights(optimizer=optax.adam(1e-2)), gf.Collective()],
                         ids=["adam", "collective"])
def test_state_resumes_a_run(getkey, engine):
    """`simulate(..., state=traj.state)` continues a run where it stopped (optax state too)."""
    net, X, y = problem(getkey(), 2, P=8)
    lr = None if isinstance(engine, gf.Weights) else 0.05
    whole = gf.simulate(net, X, y, steps=20, lr=lr, engine=engine, record_every=10)
    first = gf.simulate(net, X, y, steps=10, lr=lr, engine=engine, record_every=10)
    rest = gf.simulate(net, X, y, steps=10, lr=lr, engine=engine, record_every=10,
                       state=first.state)
    assert rest.engine is engine
    assert_rel_close(rest.r, whole.r[1:], jnp.float64, what="r")
    assert_rel_close(rest.final.weights, whole.final.weights, jnp.float64, what="W")
    assert_rel_close(rest.state, whole.state, jnp.float64, what="state")


def test_record_every_and_steps(getkey):
    net, X, y = problem(getkey(), 1, P=8)
    traj = gf.simulate(net, X, y, steps=10, lr=0.01, record_every=3)
    assert traj.step.tolist() == [0, 3, 6, 9, 10]
    full = gf.simulate(net, X, y, steps=10, lr=0.01)
    assert_rel_close(traj.r, full.r[jnp.array([0, 3, 6, 9, 10])], jnp.float64)
    assert traj.loss.shape == (5,) and traj.r.shape == (5, 8)


def _balance(ws):
    """Per-neuron balance `‖W_l[i, :]‖² − ‖W_{l+1}[:, i]‖²` of layers 1..L−1, by hand."""
    return [jnp.sum(ws[l] ** 2, 1) - jnp.sum(ws[l + 1] ** 2, 0) for l in range(len(ws) - 1)]


@pytest.mark.parametrize("engine", [gf.Weights(), gf.Collective()], ids=["weights", "collective"])
def test_observables_match_direct_computation(getkey, engine):
    net, X, y = problem(getkey(), 3, out_dim=2, P=8)
    # Every observable, balance_drift too: the collective engine rebuilds W_1 from its fields.
    # (those of test sites are checked in test_spectators.py, gradient_noise in test_sgd.py)
    names = [n for n in gf.OBSERVABLES if n not in ("test_loss", "test_error", "test_output",
                                                     "cross_kernel", "test_alignment",
                                                     "gradient_noise")]
    traj = gf.simulate(net, X, y, steps=6, lr=0.02, engine=engine, observables=names, top_m=3,
                       record_every=3)
    obs = traj.observables
    ref = gf.simulate(net, X, y, steps=3, lr=0.02, record_every=3)
    nets = [net, ref.final]
    K0 = gf.layer_kernels(net, X)
    for i, n in enumerate(nets):
        lk = gf.layer_kernels(n, X)
        K = lk.total.transpose(0, 2, 1, 3).reshape(16, 16)
        traces = jnp.stack([jnp.trace(k.transpose(0, 2, 1, 3).reshape(16, 16)) for k in lk.K])
        assert_rel_close(obs["kernel_trace"][i], traces, jnp.float64)
        assert_rel_close(obs["kernel_share"][i], traces / traces.sum(), jnp.float64)
        assert_rel_close(obs["kernel"][i], lk.total, jnp.float64)
        assert_rel_close(obs["kernel_eigs"][i], jnp.linalg.eigvalsh(K)[::-1][:3], jnp.float64)
        layer_eigs = [jnp.linalg.eigvalsh(k.transpose(0, 2, 1, 3).reshape(16, 16))[::-1][:3] for k in lk.K]
        assert_rel_close(obs["layer_kernel_eigs"][i], jnp.stack(layer_eigs), jnp.float64)
        K0f = K0.total.transpose(0, 2, 1, 3).reshape(16, 16)
        drift = jnp.linalg.norm(K - K0f) / jnp.linalg.norm(K0f)
        assert abs(float(obs["kernel_drift"][i] - drift)) <= 1e-12
        v = y.reshape(-1)
        align = v @ K @ v / (jnp.linalg.norm(K) * (v @ v))
        assert abs(float(obs["alignment"][i] - align)) <= 1e-12
        H = plain_f(n.weights, n.readout, n.scales, X)[1]
        assert_rel_close(obs["active_fraction"][i], jnp.stack([jnp.mean((h > 0).astype(jnp.float64)) for h in H]), jnp.float64)
        q_drift = [jnp.linalg.norm(q - q0) / jnp.linalg.norm(q0) for q, q0 in zip(lk.Q, K0.Q)]
        assert jnp.allclose(obs["coactivation_drift"][i], jnp.stack(q_drift), atol=1e-12)
        # balance_drift: max_i |b_i(t) − b_i(0)| of the laws of layers 1..L−1.
        b_drift = [jnp.max(jnp.abs(b - b0))
                   for b, b0 in zip(_balance(n.weights), _balance(net.weights))]
        assert jnp.allclose(obs["balance_drift"][i, :2], jnp.stack(b_drift), atol=1e-12)
        assert bool(jnp.isnan(obs["balance_drift"][i, 2]))  # the fixed readout: no law
    assert float(obs["kernel_drift"][0]) == 0.0 and float(obs["kernel_drift"][1]) > 0.0


def test_divergence_reports_first_nonfinite(getkey):
    net, X, y = problem(jax.random.key(0), 1, P=8)  # deeper nets tend to die instead
    lr = 50.0 / _lam_max(net, X)
    with pytest.warns(RuntimeWarning, match="non-finite at step .* smaller lr"):
        traj = gf.simulate(net, X, y, steps=400, lr=lr, record_every=50)
    n = int(traj.first_nonfinite)
    assert 0 < n <= 400
    _, rs = _gd_loop(net, X, y, lr, n)
    assert np.isfinite(float(jnp.sum(rs[n - 1] ** 2))) and not np.isfinite(float(jnp.sum(rs[n] ** 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = gf.simulate(net, X, y, steps=50, lr=0.5 / _lam_max(net, X))
    assert int(ok.first_nonfinite) == -1


def _final_loss_fn(net, X, y, engine, kind):
    def fn(lr, scale, X):
        scaled = eqx.tree_at(lambda n: n.weights, net, tuple(scale * w for w in net.weights))
        if kind == "simulate":
            traj = gf.simulate(scaled, X, y, steps=20, lr=lr, engine=engine, record_every=20)
        else:
            traj = gf.flow(scaled, X, y, t1=0.5, ts=jnp.array([0.5]), lr=lr, engine=engine,
                           stepsize_controller=pid(1e-12, 1e-12))
        return traj.loss[-1]

    return fn


@pytest.mark.parametrize("engine", [gf.Weights(), gf.Collective()], ids=["weights", "collective"])
@pytest.mark.parametrize("kind", ["simulate", "flow"])
def test_gradients_match_finite_differences(getkey, engine, kind):
    net, X, y = _task(jax.random.key(1), 2 if kind == "simulate" else 1,
                      (10, 8) if kind == "simulate" else (32,), P=8, d=3)
    fn = _final_loss_fn(net, X, y, engine, kind)
    args = (jnp.asarray(0.1), jnp.asarray(1.0), X)
    grads = jax.grad(fn, argnums=(0, 1, 2))(*args)
    eps = 1e-6
    for i, g in enumerate(grads):
        direction = jax.random.normal(getkey(), jnp.shape(args[i]))
        plus = list(args)
        minus = list(args)
        plus[i] = args[i] + eps * direction
        minus[i] = args[i] - eps * direction
        fd = (fn(*plus) - fn(*minus)) / (2 * eps)
        ad = jnp.vdot(g, direction)
        assert abs(float(ad - fd)) <= 1e-6 * max(1.0, abs(float(fd))), (i, float(ad), float(fd))


def test_simulate_under_vmap_over_lrs(getkey):
    net, X, y = problem(getkey(), 2, P=8)
    lrs = jnp.array([0.01, 0.02, 0.04])
    batched = jax.vmap(
        lambda lr: gf.simulate(net, X, y, steps=15, lr=lr, engine=gf.Collective()).loss)(lrs)
    for i, lr in enumerate(lrs):
        single = gf.simulate(net, X, y, steps=15, lr=float(lr), engine=gf.Collective()).loss
        assert rel_err(batched[i], single) <= 1e-13


def test_bad_configurations(getkey):
    net, X, y = problem(getkey(), 2, P=8)
    # Engines are objects: a string (the former API) or any other object is refused.
    with pytest.raises(TypeError, match="engine object, not the string 'collective'"):
        gf.simulate(net, X, y, steps=3, lr=0.1, engine="collective")
    with pytest.raises(TypeError, match="`reference` takes an engine object"):
        gf.simulate(net, X, y, steps=3, lr=0.1, reference="weights")
    with pytest.raises(TypeError, match="`engine` must be a gramflow engine"):
        gf.simulate(net, X, y, steps=3, lr=0.1, engine=optax.sgd(0.1))
    # An optimizer lives in Weights (only there, by construction) and carries its own step.
    with pytest.raises(ValueError, match="`lr` and an optimizer were both given"):
        gf.simulate(net, X, y, steps=3, lr=0.1, engine=gf.Weights(optimizer=optax.sgd(0.1)))
    with pytest.raises(ValueError, match="reference=gf.Weights\\(optimizer=...\\)"):
        gf.simulate(net, X, y, steps=3, engine=gf.Weights(optimizer=optax.sgd(0.1)),
                    reference=gf.Weights())
    with pytest.raises(ValueError, match="an optimizer has no flow"):
        gf.flow(net, X, y, t1=1.0, engine=gf.Weights(optimizer=optax.sgd(0.1)))
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        gf.Weights(optimizer=lambda g: g)
    with pytest.raises(ValueError, match="unknown observable.*'spectra'"):
        gf.simulate(net, X, y, steps=3, lr=0.1, observables=["spectra"])
    with pytest.raises(ValueError, match="\\(FrozenKernel\\) carries only the residual"):
        gf.simulate(net, X, y, steps=3, lr=0.1, engine=gf.FrozenKernel(),
                    observables=["kernel_trace"])
    with pytest.raises(ValueError, match="`steps` must be a positive int"):
        gf.simulate(net, X, y, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="`record_every` must be a positive int"):
        gf.simulate(net, X, y, steps=3, lr=0.1, record_every=0)
    with pytest.raises(ValueError, match="`lr` is required"):
        gf.simulate(net, X, y, steps=3)
    with pytest.raises(ValueError, match="`lr` must be positive and finite"):
        gf.simulate(net, X, y, steps=3, lr=-0.1)
    with pytest.raises(ValueError, match="`transport` must be an int ≥ 0"):
        gf.Collective(closure=gf.TruncatedTransport(-1))
    with pytest.raises(ValueError, match="`state` resumes a single run"):
        gf.simulate(net, X, y, steps=3, lr=0.1, reference=gf.Weights(),
                    state=gf.simulate(net, X, y, steps=1, lr=0.1).state)
    with pytest.raises(ValueError, match="`t1` must be positive"):
        gf.flow(net, X, y, t1=0.0)
    with pytest.raises(ValueError, match="`ts` must be non-decreasing times within"):
        gf.flow(net, X, y, t1=1.0, ts=jnp.array([0.5, 2.0]))
    with pytest.raises(ValueError, match="`y` has shape"):
        gf.simulate(net, X, y[:3], steps=3, lr=0.1)


def test_flow_sliding_error_is_explained():
    net, X, y = _task(jax.random.key(0), 1, (32,), P=8, d=3)  # this seed slides before t = 1
    with pytest.raises(RuntimeError, match="sliding"):
        gf.flow(net, X, y, t1=1.0, stepsize_controller=pid(1e-12, 1e-12), max_steps=5000)
    # Forcing a minimum step follows the sliding flow; the one-layer collective engine, a
    # linear image of the weights, still agrees with the weights engine in the same solve.
    both = gf.flow(net, X, y, t1=1.0, stepsize_controller=pid(1e-10, 1e-12, dtmin=1e-4 * 1.0),
                   engine=gf.Collective(), reference=gf.Weights())
    assert float(both.observables["closure_error"].max()) <= 1e-10
