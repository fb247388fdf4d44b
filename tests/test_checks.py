"""Every bad input of the foundation issue raises a clear error naming the argument."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import problem

import gramflow as gf

ENTRY_POINTS = {
    "collective_state": lambda net, X, y: gf.collective_state(net, X, y),
    "pullback_gradients": lambda net, X, y: gf.pullback_gradients(net, X, y),
    "verify": lambda net, X, y: gf.verify(net, X, y),
    "layer_kernels": lambda net, X, y: gf.layer_kernels(net, X),
    "collective_kernel": lambda net, X, y: gf.collective_kernel(net, X),
    "call": lambda net, X, y: net(X),
}
WITH_Y = ["collective_state", "pullback_gradients", "verify"]


@pytest.fixture
def prob(getkey):
    return problem(getkey(), 2)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("shape", [(6,), (6, 3, 1), ()])
def test_X_not_2d(prob, name, shape):
    net, X, y = prob
    with pytest.raises(ValueError, match=r"`X` must be 2-D of shape \(P, d\)"):
        ENTRY_POINTS[name](net, jnp.ones(shape), y)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_in_dim_mismatch(prob, name):
    net, X, y = prob
    with pytest.raises(ValueError, match=r"`X` has shape \(6, 4\).*in_dim = 3"):
        ENTRY_POINTS[name](net, jnp.ones((6, 4)), y)


@pytest.mark.parametrize("name", WITH_Y)
def test_X_y_length_mismatch(prob, name):
    net, X, y = prob
    with pytest.raises(ValueError, match=r"`y` has shape \(5,\).*P = 6.*expected `y` of shape \(6,\)"):
        ENTRY_POINTS[name](net, X, y[:5])


@pytest.mark.parametrize("name", WITH_Y)
def test_y_inconsistent_with_readout(getkey, name):
    net, X, y = problem(getkey(), 2)
    with pytest.raises(ValueError, match=r"scalar output.*expected `y` of shape \(6,\)"):
        ENTRY_POINTS[name](net, X, y[:, None])
    net, X, y = problem(getkey(), 2, out_dim=3)
    with pytest.raises(ValueError, match=r"k = 3.*expected `y` of shape \(6, 3\)"):
        ENTRY_POINTS[name](net, X, y[:, 0])
    with pytest.raises(ValueError, match=r"k = 3.*expected `y` of shape \(6, 3\)"):
        ENTRY_POINTS[name](net, X, y[:, :2])


def test_empty_widths(getkey):
    with pytest.raises(ValueError, match="`widths` is empty"):
        gf.ReLUNet.init(getkey(), 3, ())
    with pytest.raises(ValueError, match="`weights` is empty"):
        gf.ReLUNet(weights=(), readout=jnp.ones(3), scales=jnp.ones(1))


@pytest.mark.parametrize("widths,bad", [((4, 0), "widths\\[1\\]"), ((-2,), "widths\\[0\\]")])
def test_nonpositive_width(getkey, widths, bad):
    with pytest.raises(ValueError, match=f"`{bad}` must be a positive int"):
        gf.ReLUNet.init(getkey(), 3, widths)


def test_bad_in_dim_and_out_dim(getkey):
    with pytest.raises(ValueError, match="`in_dim` must be a positive int"):
        gf.ReLUNet.init(getkey(), 0, (4,))
    with pytest.raises(TypeError, match="`widths\\[0\\]` must be a positive int"):
        gf.ReLUNet.init(getkey(), 3, (4.5,))
    with pytest.raises(ValueError, match="`out_dim` must be a positive int"):
        gf.ReLUNet.init(getkey(), 3, (4,), out_dim=0)


def test_unknown_parametrization(getkey):
    with pytest.raises(ValueError, match="unknown parametrization 'mup'.*'standard', 'ntk', 'mean_field'"):
        gf.ReLUNet.init(getkey(), 3, (4,), parametrization="mup")


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_integer_X(prob, name):
    net, X, y = prob
    with pytest.raises(TypeError, match="`X` has dtype int.*floating-point.*astype"):
        ENTRY_POINTS[name](net, jnp.ones(X.shape, jnp.int32), y)


@pytest.mark.parametrize("name", WITH_Y)
def test_integer_y(prob, name):
    net, X, y = prob
    with pytest.raises(TypeError, match="`y` has dtype int"):
        ENTRY_POINTS[name](net, X, np.ones(y.shape, np.int64))


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_mixed_dtypes(prob, name):
    net, X, y = prob
    with pytest.raises(TypeError, match="mixed dtypes: `X` is float32 but the network is float64"):
        ENTRY_POINTS[name](net, X.astype(jnp.float32), y)


def test_mixed_dtype_leaves_and_integer_init_dtype(getkey):
    net, _, _ = problem(getkey(), 2)
    with pytest.raises(TypeError, match="mixed dtypes: `weights\\[1\\]` is float32"):
        gf.ReLUNet(
            weights=(net.weights[0], net.weights[1].astype(jnp.float32)),
            readout=net.readout,
            scales=net.scales,
        )
    with pytest.raises(TypeError, match="`weights\\[0\\]` has dtype int32"):
        gf.ReLUNet(weights=(jnp.ones((2, 3), jnp.int32),), readout=jnp.ones(2, jnp.int32),
                   scales=jnp.ones(2, jnp.int32))
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        gf.ReLUNet.init(getkey(), 3, (4,), dtype=jnp.int32)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_X_eager(prob, name, value):
    net, X, y = prob
    X = X.at[2, 1].set(value)
    with pytest.raises(ValueError, match=r"`X` contains 1 NaN or inf value\(s\), the first at index \(2, 1\)"):
        ENTRY_POINTS[name](net, X, y)


@pytest.mark.parametrize("name", WITH_Y)
def test_nonfinite_y_eager(prob, name):
    net, X, y = prob
    with pytest.raises(ValueError, match="`y` contains 1 NaN or inf"):
        ENTRY_POINTS[name](net, X, y.at[0].set(np.nan))


@pytest.mark.parametrize("name", ["collective_state", "collective_kernel"])
def test_nonfinite_under_jit_raises_at_run_time(prob, name):
    """Under `jit` the finiteness check becomes `equinox.error_if`: it raises when run."""
    net, X, y = prob
    fn = jax.jit(ENTRY_POINTS[name])
    jax.block_until_ready(fn(net, X, y))  # finite inputs: no error
    with pytest.raises(Exception, match="`X` contains NaN or inf values"):
        jax.block_until_ready(fn(net, X.at[0, 0].set(np.nan), y))


def test_direct_construction_validates_shapes():
    w1, w2 = jnp.ones((4, 3)), jnp.ones((5, 4))
    gf.ReLUNet(weights=(w1, w2), readout=jnp.ones(5), scales=jnp.ones(3))  # fine
    gf.ReLUNet(weights=[w1, w2], readout=jnp.ones((5, 2)), scales=jnp.ones(3))  # list ok
    with pytest.raises(ValueError, match=r"`weights\[1\]` has shape \(5, 3\): its fan-in 3 must equal the width 4"):
        gf.ReLUNet(weights=(w1, jnp.ones((5, 3))), readout=jnp.ones(5), scales=jnp.ones(3))
    with pytest.raises(ValueError, match=r"`weights\[0\]` \(W_1\) must be 2-D"):
        gf.ReLUNet(weights=(jnp.ones(4),), readout=jnp.ones(4), scales=jnp.ones(2))
    with pytest.raises(ValueError, match=r"`readout` must have shape \(5,\) or \(5, k\)"):
        gf.ReLUNet(weights=(w1, w2), readout=jnp.ones(4), scales=jnp.ones(3))
    with pytest.raises(ValueError, match=r"`scales` must have shape \(L\+1,\) = \(3,\)"):
        gf.ReLUNet(weights=(w1, w2), readout=jnp.ones(5), scales=jnp.ones(2))
    with pytest.raises(TypeError, match="`weights` must be a tuple or list"):
        gf.ReLUNet(weights=w1, readout=jnp.ones(4), scales=jnp.ones(2))


def test_batched_network_without_vmap(getkey):
    nets = jax.vmap(lambda k: gf.ReLUNet.init(k, 3, (4,)))(jax.random.split(getkey(), 2))
    with pytest.raises(ValueError, match="batch of networks.*jax.vmap"):
        gf.collective_kernel(nets, jnp.ones((5, 3)))


def test_not_a_network():
    with pytest.raises(TypeError, match="`net` must be a gramflow.ReLUNet"):
        gf.collective_kernel({"weights": 1}, jnp.ones((5, 3)))


def test_verify_refuses_huge_jacobians(getkey):
    net = gf.ReLUNet.init(getkey(), 4, (4096, 4096))
    with pytest.raises(ValueError, match="GiB.*above the 2 GiB limit.*subset of the samples"):
        gf.verify(net, jnp.ones((64, 4)), jnp.ones(64))


@pytest.mark.parametrize("name", sorted(set(ENTRY_POINTS) - {"call"}))
def test_tree_at_cannot_bypass_validation(prob, name):
    """`equinox.tree_at` rebuilds a network without `__init__`; every entry point validates
    it again, with the constructor's message."""
    net, X, y = prob
    wrong_shape = eqx.tree_at(lambda n: n.weights, net, (net.weights[0], net.weights[1][:, :-1]))
    shape_error = r"`weights\[1\]` has shape \(\d+, \d+\): its fan-in \d+ must equal the width"
    with pytest.raises(ValueError, match=shape_error):
        ENTRY_POINTS[name](wrong_shape, X, y)
    wrong_dtype = eqx.tree_at(lambda n: n.readout, net, net.readout.astype(jnp.float32))
    with pytest.raises(TypeError, match=r"mixed dtypes: `weights\[0\]` is float64 but `readout` "
                                        r"is float32"):
        ENTRY_POINTS[name](wrong_dtype, X, y)
    with pytest.raises(ValueError, match=shape_error):  # shapes only: checked under jit too
        jax.jit(ENTRY_POINTS[name])(wrong_shape, X, y)
