"""Test sites ride along every engine without entering the loss (I9)."""

import jax
import jax.numpy as jnp
import pytest

import gramflow as gf
from helpers import rel_err


def _problem(getkey, L, out_dim=None, **kw):
    X, y = gf.teacher_student(getkey(), samples=28, in_dim=4, out_dim=out_dim,
                              dtype=jnp.float64)
    net = gf.ReLUNet.init(getkey(), 4, (8,) * L, out_dim=out_dim, dtype=jnp.float64, **kw)
    return net, X[:20], y[:20], (X[20:], y[20:])


@pytest.mark.parametrize("L, out_dim", [(1, None), (2, 3), (4, None)])
def test_spectators_under_the_collective_engine_equal_the_forward_pass(getkey, L, out_dim):
    net, X, y, test = _problem(getkey, L, out_dim)
    kw = dict(steps=40, lr=0.2, record_every=10, test=test, observables=("test_output",))
    ws = gf.simulate(net, X, y, **kw)
    co = gf.simulate(net, X, y, engine=gf.Collective(), **kw)
    assert rel_err(co.observables["test_output"], ws.observables["test_output"]) <= 1e-10
    assert rel_err(ws.observables["test_output"][-1], ws.final(test[0])) <= 1e-14
    assert rel_err(co.observables["test_output"][0], net(test[0])) <= 1e-14
    # The test sites never enter the loss: the training trajectory is the same without them.
    plain = gf.simulate(net, X, y, engine=gf.Collective(), steps=40, lr=0.2, record_every=10)
    assert rel_err(co.loss, plain.loss) == 0.0


def test_spectators_of_a_structured_first_layer(getkey):
    net, X, y, test = _problem(getkey, 2, masks=[gf.Mask.banded((8, 4), 1), None], gains=1.1,
                               train=("weights", "gains"))
    kw = dict(steps=20, lr=0.1, record_every=5, test=test,
              observables=("test_output", "test_loss", "test_error"))
    ws = gf.simulate(net, X, y, **kw)
    co = gf.simulate(net, X, y, engine=gf.Collective(), **kw)
    for name in kw["observables"]:
        assert rel_err(co.observables[name], ws.observables[name]) <= 1e-10


def test_spectators_under_the_frozen_kernel_and_the_flow(getkey):
    net, X, y, (Xs, ys) = _problem(getkey, 2)
    fk = gf.simulate(net, X, y, steps=30, lr=0.2, record_every=10, engine=gf.FrozenKernel(),
                     test=(Xs, ys), observables=("test_output",))
    lazy = gf.lazy_predictions(gf.collective_kernel(net, X), y, net(X), lr=0.2,
                               steps=jnp.arange(0, 31, 10),
                               K_test=gf.collective_kernel(net, Xs, X), f0_test=net(Xs))
    assert rel_err(fk.observables["test_output"], lazy.test) <= 1e-10
    ts = jnp.array([0.0, 0.5, 1.0])
    ff = gf.flow(net, X, y, t1=1.0, ts=ts, lr=0.2, engine=gf.FrozenKernel(), test=(Xs, ys),
                 observables=("test_output",))
    lazy_t = gf.lazy_predictions(gf.collective_kernel(net, X), y, net(X), lr=0.2, t=ts,
                                 K_test=gf.collective_kernel(net, Xs, X), f0_test=net(Xs))
    assert rel_err(ff.observables["test_output"], lazy_t.test) <= 1e-10
    fw = gf.flow(net, X, y, t1=1.0, ts=ts, lr=0.2, test=(Xs, ys), observables=("test_output",))
    fc = gf.flow(net, X, y, t1=1.0, ts=ts, lr=0.2, engine=gf.Collective(), test=(Xs, ys),
                 observables=("test_output",))
    assert rel_err(fc.observables["test_output"], fw.observables["test_output"]) <= 1e-5


def test_test_observables_and_their_errors(getkey):
    net, X, y, (Xs, ys) = _problem(getkey, 1)
    run = gf.simulate(net, X, y, steps=5, lr=0.1, test=(Xs, ys),
                      observables=("test_output", "test_loss", "test_error", "cross_kernel",
                                   "test_alignment"))
    f = run.observables["test_output"]
    assert rel_err(run.observables["test_loss"], 0.5 * jnp.sum((f - ys[None]) ** 2, 1)) <= 1e-14
    wrong = jnp.mean(jnp.sign(f) != jnp.sign(ys[None]), 1)
    assert rel_err(run.observables["test_error"], wrong) <= 1e-14
    assert rel_err(run.observables["cross_kernel"][-1],
                   gf.collective_kernel(run.final, Xs, X)) <= 1e-12
    K = gf.collective_kernel(run.final, Xs)
    assert rel_err(run.observables["test_alignment"][-1],
                   ys @ K @ ys / (jnp.linalg.norm(K) * (ys @ ys))) <= 1e-12
    defaults = gf.simulate(net, X, y, steps=2, lr=0.1, test=(Xs, ys))
    assert {"test_loss", "test_error"} <= set(defaults.observables)
    with pytest.raises(ValueError, match="test=\\(X_test, y_test\\)"):
        gf.simulate(net, X, y, steps=2, lr=0.1, observables=("test_loss",))
    with pytest.raises(ValueError, match="in `test="):
        gf.simulate(net, X, y, steps=2, lr=0.1, test=(Xs[:, :3], ys))
    with pytest.raises(TypeError, match="pair"):
        gf.simulate(net, X, y, steps=2, lr=0.1, test=Xs)
