"""Velocities (I2, I4, I5) against jax.jvp of the weight-space maps along −∇L, and the O(η²)
remainder of one GD step (I7)."""

import itertools

import jax
import jax.numpy as jnp
import pytest
from helpers import WIDTHS, assert_rel_close, per_sample_grad, plain_f, problem

import gramflow as gf


def _descent(net, X, y):
    loss = lambda ws: 0.5 * jnp.sum((plain_f(ws, net.readout, net.scales, X)[0] - y) ** 2)  # noqa: E731
    return jax.tree.map(jnp.negative, jax.grad(loss)(net.weights))


@jax.jit  # the autodiff reference as one program (eagerly, each operation compiles alone)
def _reference_velocities(net, X, y):
    """`df`, `dH_l`, `dB_l` along −∇L by jax.jvp of the plain function and of its jacrev."""
    tangent = _descent(net, X, y)
    _, (df, dH) = jax.jvp(lambda ws: plain_f(ws, net.readout, net.scales, X), (net.weights,),
                          (tangent,))

    def conjugate(ws):
        return per_sample_grad(gf.ReLUNet(ws, net.readout, net.scales), X, "z")

    _, dB = jax.jvp(conjugate, (net.weights,), (tangent,))
    return df, dH, dB


CASES = list(itertools.product(sorted(WIDTHS), [None, 2], [jnp.float64, jnp.float32]))


@pytest.mark.parametrize("depth,out_dim,dtype", CASES)
def test_velocities_match_jvp(getkey, depth, out_dim, dtype):
    net, X, y = problem(getkey(), depth, out_dim=out_dim, dtype=dtype)
    v = gf.velocities(net, X, y)
    df, dH, dB = _reference_velocities(net, X, y)
    assert_rel_close(v.r, df, dtype, what="dr/dt")
    assert_rel_close(v.H, dH, dtype, what="dH/dt")
    assert_rel_close(v.B[:-1], dB[:-1], dtype, what="dB/dt")
    assert float(jnp.abs(v.B[-1]).max()) == 0.0  # fixed readout: B_L is constant
    # (I2): dr/dt = −K r with the collective kernel.
    K = gf.collective_kernel(net, X)
    r = net(X) - y
    Kr = K @ r if out_dim is None else jnp.einsum("mnij,nj->mi", K, r)
    assert_rel_close(v.r, -Kr, dtype, what="-K r")


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_step_remainder_is_second_order(getkey, depth, out_dim):
    X, y = gf.teacher_student(getkey(), samples=10, in_dim=4, out_dim=out_dim)
    net = gf.ReLUNet.init(getkey(), 4, WIDTHS[depth][::-1], out_dim=out_dim)
    eta = 1e-2
    big = gf.step_remainder(net, X, y, lr=eta).norms()
    small = gf.step_remainder(net, X, y, lr=eta / 2).norms()
    ratio = big["r"] / small["r"]
    assert 3.0 <= ratio <= 5.0, ratio
    for name in ["H", "B"] if depth >= 3 else ["H"]:
        # Fields linear in the weights (H_1; B_{L-1}, B_L) have no remainder.
        nonlinear = big[name] > 1e-12
        assert bool(jnp.any(nonlinear))
        ratios = big[name][nonlinear] / small[name][nonlinear]
        assert bool(jnp.all((ratios >= 3.0) & (ratios <= 5.0))), (name, ratios)
    # The remainder is small against the step itself.
    rem = gf.step_remainder(net, X, y, lr=eta)
    assert float(big["r"]) < 1e-2 * float(jnp.linalg.norm(rem.actual.r))
