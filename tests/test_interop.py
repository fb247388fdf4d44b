"""Interop with equinox: `ReLUNet.from_equinox` / `to_equinox` keep the function and the
kernels; MLPs outside what gramflow describes are refused with the reason; `trainable` is the
filter that keeps the fixed readout and scales out of `eqx.filter_grad`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import gramflow as gf
from helpers import rel_err


def _mlp(key, out_size, depth=2, width=8, d=3, **kw):
    kw = {"activation": jax.nn.relu, "use_bias": False, "use_final_bias": False, **kw}
    return eqx.nn.MLP(d, out_size, width, depth, dtype=jnp.float64, key=key, **kw)


@pytest.mark.parametrize("out_size", ["scalar", 2])
@pytest.mark.parametrize("parametrization", ["standard", "ntk"])
def test_round_trip_keeps_outputs_and_kernels(getkey, out_size, parametrization):
    mlp = _mlp(getkey(), out_size)
    X = jax.random.normal(getkey(), (6, 3), jnp.float64)
    net = gf.ReLUNet.from_equinox(mlp, parametrization=parametrization)
    assert net.out_dim == (None if out_size == "scalar" else out_size)
    f_eqx = jax.vmap(mlp)(X)
    assert rel_err(net(X), f_eqx) <= 1e-12
    assert rel_err(net(X[0]), mlp(X[0])) <= 1e-12  # a single sample, as equinox calls it
    back = net.to_equinox()
    assert rel_err(jax.vmap(back)(X), f_eqx) <= 1e-12
    # The kernel over the hidden weights from the fields equals J Jᵀ of the equinox model,
    # with J = ∂f/∂W_l = s_l ∂f/∂W_l^eqx (W_l^eqx = s_l W_l).
    params, rest = eqx.partition(mlp, eqx.is_inexact_array)
    hidden = [layer.weight for layer in params.layers[:-1]]

    def f_of(ws):
        p = eqx.tree_at(lambda m: [layer.weight for layer in m.layers[:-1]], params, ws)
        return jax.vmap(eqx.combine(p, rest))(X)

    jac = jax.jacrev(f_of)(hidden)
    P = X.shape[0]
    k = 1 if out_size == "scalar" else out_size
    J = jnp.concatenate([(s * j).reshape(P * k, -1) for s, j in zip(net.scales, jac)], axis=1)
    K_ref = J @ J.T
    if out_size != "scalar":
        K_ref = K_ref.reshape(P, k, P, k).transpose(0, 2, 1, 3)
    assert rel_err(gf.collective_kernel(net, X), K_ref) <= 1e-12


def test_to_equinox_folds_structure_into_the_weights(getkey):
    X = jax.random.normal(getkey(), (6, 8), jnp.float64)
    net = gf.ReLUNet.init(getkey(), 8, (8, 8), masks=[None, gf.Mask.block_diagonal((8, 8), 2)],
                          gains=1.3, skips=0.5, dtype=jnp.float64)
    mlp = net.to_equinox()
    assert all(layer.bias is None for layer in mlp.layers)
    assert rel_err(jax.vmap(mlp)(X), net(X)) <= 1e-12
    again = gf.ReLUNet.from_equinox(mlp)  # the function survives; the structure does not
    assert again.masks is None and again.skips is None
    assert rel_err(again(X), net(X)) <= 1e-12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_bias": True}, "biases"),
        ({"use_final_bias": True}, "biases"),
        ({"activation": jax.nn.tanh}, "activation"),
        ({"activation": jax.nn.relu6}, "activation"),
        ({"activation": jax.nn.leaky_relu}, "activation"),
        ({"final_activation": jax.nn.relu}, "final_activation"),
        ({"depth": 0}, "depth 0"),
    ],
)
def test_from_equinox_refuses_what_it_cannot_describe(getkey, kwargs, match):
    depth = kwargs.pop("depth", 2)
    mlp = _mlp(getkey(), "scalar", depth=depth, **kwargs)
    with pytest.raises(ValueError, match=match):
        gf.ReLUNet.from_equinox(mlp)


def test_other_refusals(getkey):
    with pytest.raises(ValueError, match="in_size='scalar'"):
        gf.ReLUNet.from_equinox(eqx.nn.MLP("scalar", "scalar", 4, 1, activation=jax.nn.relu,
                                           use_bias=False, use_final_bias=False, key=getkey()))
    with pytest.raises(TypeError, match="equinox.nn.MLP"):
        gf.ReLUNet.from_equinox(eqx.nn.Linear(3, 4, key=getkey()))
    with pytest.raises(ValueError, match="parametrization"):
        gf.ReLUNet.from_equinox(_mlp(getkey(), "scalar"), parametrization="mup")
    with pytest.raises(ValueError, match="one hidden width"):
        gf.ReLUNet.init(getkey(), 3, (8, 4)).to_equinox()


def test_trainable_filter_keeps_readout_and_scales_out_of_filter_grad(getkey):
    net = gf.ReLUNet.init(getkey(), 3, (8, 8), gains=1.0, dtype=jnp.float64)
    X = jax.random.normal(getkey(), (5, 3), jnp.float64)
    y = jax.random.normal(getkey(), (5,), jnp.float64)
    params, rest = eqx.partition(net, gf.trainable(net))

    @eqx.filter_grad
    def grad(p):
        return 0.5 * jnp.sum((eqx.combine(p, rest)(X) - y) ** 2)

    g = grad(params)
    assert g.readout is None and g.scales is None
    ours = gf.parameter_gradients(net, X, y)
    for a, b in zip(g.weights, ours.weights):
        assert rel_err(a, b) <= 1e-12
    assert rel_err(g.gains, ours.gains) <= 1e-12
