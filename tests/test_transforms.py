"""jit and vmap (over a batch of networks, over inputs) agree with a Python loop."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import WIDTHS, problem

import gramflow as gf

FUNCTIONS = {
    "state": lambda net, X, y: gf.collective_state(net, X, y),
    "gradients": lambda net, X, y: gf.pullback_gradients(net, X, y),
    "layer_kernels": lambda net, X, y: gf.layer_kernels(net, X),
    "kernel": lambda net, X, y: gf.collective_kernel(net, X),
    "output": lambda net, X, y: net(X),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("out_dim", [None, 3])
def test_jit_matches_eager(getkey, name, out_dim):
    net, X, y = problem(getkey(), 3, out_dim=out_dim)
    fn = FUNCTIONS[name]
    jitted = jax.jit(eqx.debug.assert_max_traces(fn, max_traces=1))
    chex.assert_trees_all_close(jitted(net, X, y), fn(net, X, y), rtol=1e-13, atol=1e-13)
    # A second call with new values of the same shapes does not retrace.
    net2, X2, y2 = problem(getkey(), 3, out_dim=out_dim)
    chex.assert_trees_all_close(jitted(net2, X2, y2), fn(net2, X2, y2), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("out_dim", [None, 2])
def test_vmap_over_networks_matches_loop(getkey, name, out_dim):
    d, widths = 3, WIDTHS[3]
    keys = jax.random.split(getkey(), 4)
    nets = jax.vmap(lambda k: gf.ReLUNet.init(k, d, widths, out_dim=out_dim))(keys)
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(nets))
    _, X, y = problem(getkey(), 3, out_dim=out_dim)
    fn = FUNCTIONS[name]
    batched = jax.vmap(fn, in_axes=(0, None, None))(nets, X, y)
    for i, key in enumerate(keys):
        net = gf.ReLUNet.init(key, d, widths, out_dim=out_dim)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], batched), fn(net, X, y), rtol=1e-13, atol=1e-13
        )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_vmap_over_inputs_matches_loop(getkey, name):
    net, _, _ = problem(getkey(), 2, out_dim=2)
    Xs = jax.random.normal(getkey(), (3, 5, net.in_dim))
    ys = jax.random.normal(getkey(), (3, 5, 2))
    fn = FUNCTIONS[name]
    batched = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(net, Xs, ys)
    for i in range(3):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], batched), fn(net, Xs[i], ys[i]), rtol=1e-13, atol=1e-13
        )


def test_verify_under_jit_and_vmap(getkey):
    keys = jax.random.split(getkey(), 3)
    nets = jax.vmap(lambda k: gf.ReLUNet.init(k, 3, (5, 4)))(keys)
    _, X, y = problem(getkey(), 2)
    reports = jax.jit(jax.vmap(gf.verify, in_axes=(0, None, None)))(nets, X, y)
    assert reports.kernel.shape == (3,)
    assert reports.ok()


def test_grad_through_kernel_matches_finite_differences(getkey):
    """The kernel is differentiable in the inputs and weights (used by later diagnostics)."""
    net, X, _ = problem(getkey(), 2)
    fn = lambda X: jnp.trace(gf.collective_kernel(net, X))  # noqa: E731
    g = jax.grad(fn)(X)
    V = jax.random.normal(getkey(), X.shape)
    eps = 1e-6
    fd = (fn(X + eps * V) - fn(X - eps * V)) / (2 * eps)
    assert abs(jnp.vdot(g, V) - fd) <= 1e-7 * (1 + abs(fd))


def test_init_dtype_default_and_explicit(getkey):
    key = getkey()
    assert gf.ReLUNet.init(key, 3, (4,)).dtype == jnp.float64  # x64 enabled in conftest
    net32 = gf.ReLUNet.init(key, 3, (4,), dtype=jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(net32))
