"""Fields (I1), pullback gradients (I1) and layer-wise kernels (I2) against autodiff of an
independent weight-space function, over depth 1–4, odd unequal widths, the three
parametrizations, scalar and vector outputs, float64 and float32."""

import itertools

import jax
import jax.numpy as jnp
import pytest
from helpers import (
    DTYPES,
    OUT_DIMS,
    PARAMETRIZATIONS,
    WIDTHS,
    assert_rel_close,
    jacobian_kernels,
    net_f,
    per_sample_grad,
    plain_f,
    problem,
)

import gramflow as gf

CASES = list(itertools.product(sorted(WIDTHS), PARAMETRIZATIONS, OUT_DIMS, DTYPES))
IDS = [f"L{L}-{p}-k{k}-{jnp.dtype(t).name}" for L, p, k, t in CASES]


@pytest.mark.parametrize("depth,param,out_dim,dtype", CASES, ids=IDS)
def test_fields_match_autodiff(getkey, depth, param, out_dim, dtype):
    net, X, y = problem(getkey(), depth, out_dim=out_dim, parametrization=param, dtype=dtype)
    state = gf.collective_state(net, X, y)
    f, hs = plain_f(net.weights, net.readout, net.scales, X)
    L = depth
    assert len(state.H) == len(state.D) == len(state.B) == len(state.Delta) == L
    assert len(state.Z) == L + 1 and state.Z[0] is not None
    assert_rel_close(state.Z[0], X, dtype, what="Z_0")
    assert_rel_close(state.H, hs, dtype, what="H")
    assert_rel_close(state.Z[1:], [jnp.maximum(h, 0) for h in hs], dtype, what="Z")
    assert_rel_close(state.D, [(h > 0).astype(dtype) for h in hs], dtype, what="D")
    assert_rel_close(state.f, f, dtype, what="f")
    assert_rel_close(state.r, f - y, dtype, what="r")
    assert_rel_close(state.Delta, per_sample_grad(net, X, "h"), dtype, what="Delta")
    assert_rel_close(state.B, per_sample_grad(net, X, "z"), dtype, what="B")
    k = () if out_dim is None else (out_dim,)
    for l, n in enumerate(WIDTHS[depth]):
        assert state.B[l].shape == state.Delta[l].shape == (X.shape[0], *k, n)
        assert state.B[l].dtype == dtype


@pytest.mark.parametrize("depth,param,out_dim,dtype", CASES, ids=IDS)
def test_pullback_gradients_match_grad(getkey, depth, param, out_dim, dtype):
    net, X, y = problem(getkey(), depth, out_dim=out_dim, parametrization=param, dtype=dtype)
    grads = gf.pullback_gradients(net, X, y)
    ref = jax.grad(lambda ws: 0.5 * jnp.sum((plain_f(ws, net.readout, net.scales, X)[0] - y) ** 2))(
        net.weights
    )
    assert isinstance(grads, tuple) and len(grads) == depth
    assert [g.shape for g in grads] == [w.shape for w in net.weights]
    assert_rel_close(grads, ref, dtype, what="dL/dW")


@pytest.mark.parametrize("depth,param,out_dim,dtype", CASES, ids=IDS)
def test_kernels_match_jacobian(getkey, depth, param, out_dim, dtype):
    net, X, y = problem(getkey(), depth, out_dim=out_dim, parametrization=param, dtype=dtype)
    P = X.shape[0]
    kernels = gf.layer_kernels(net, X)
    ref = jacobian_kernels(net, X)
    assert_rel_close(kernels.K, ref, dtype, what="K_l")
    assert_rel_close(kernels.total, sum(ref), dtype, what="K")
    assert_rel_close(gf.collective_kernel(net, X), sum(ref), dtype, what="collective_kernel")
    # The factors: G_{l-1} = Z_{l-1} Z_{l-1}ᵀ and Q_l = Δ_l Δ_lᵀ from autodiff fields.
    _, hs = plain_f(net.weights, net.readout, net.scales, X)
    Zs = [X] + [jnp.maximum(h, 0) for h in hs[:-1]]
    assert_rel_close(kernels.G, [z @ z.T for z in Zs], dtype, what="G")
    Deltas = per_sample_grad(net, X, "h")
    Qs = [
        d @ d.T if d.ndim == 2 else jnp.einsum("mia,nja->mnij", d, d) for d in Deltas
    ]
    assert_rel_close(kernels.Q, Qs, dtype, what="Q")
    shape = (P, P) if out_dim is None else (P, P, out_dim, out_dim)
    assert kernels.total.shape == shape and kernels.total.dtype == dtype


@pytest.mark.parametrize("out_dim", OUT_DIMS)
def test_residual_flow_matches_jvp(getkey, out_dim):
    """(I2): dr/dt = −K r equals the jvp of f along −∇L (η = 1)."""
    net, X, y = problem(getkey(), 3, out_dim=out_dim)
    grad = jax.grad(lambda ws: 0.5 * jnp.sum((plain_f(ws, net.readout, net.scales, X)[0] - y) ** 2))(
        net.weights
    )
    _, dr = jax.jvp(
        lambda ws: plain_f(ws, net.readout, net.scales, X)[0],
        (net.weights,),
        (jax.tree.map(jnp.negative, grad),),
    )
    K = gf.collective_kernel(net, X)
    r = net_f(net, X) - y
    Kr = K @ r if out_dim is None else jnp.einsum("mnij,nj->mi", K, r)
    assert_rel_close(-Kr, dr, jnp.float64, what="dr/dt")


def test_one_hidden_layer_factorization(getkey):
    """(I3): K = s_1² C ⊙ Q_1 with C = X Xᵀ and Q_1 = (D_1 ⊙ a)(D_1 ⊙ a)ᵀ s_out²."""
    net, X, y = problem(getkey(), 1)
    s1, s_out = net.scales
    D = (s1 * X @ net.weights[0].T > 0).astype(X.dtype)
    Da = D * (s_out * net.readout)[None, :]
    expected = s1**2 * (X @ X.T) * (Da @ Da.T)
    assert_rel_close(gf.collective_kernel(net, X), expected, jnp.float64, what="K (I3)")


def test_network_call_matches_plain_function(getkey):
    for out_dim in OUT_DIMS:
        net, X, _ = problem(getkey(), 2, out_dim=out_dim)
        assert_rel_close(net(X), net_f(net, X), jnp.float64, what="net(X)")
