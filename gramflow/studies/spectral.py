"""Spectral diagnostics: eigenvalue sensitivity of the kernels and sharpness of the loss."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._algebra import flat_kernel
from ..fields.kernels import layer_kernels
from ..fields.matvec import block_krylov_eigs
from ..model.network import (
    ReLUNet,
    _positive_int,
    check_inputs,
    forward,
    parameters,
    trainable,
    with_parameters,
)


class Sensitivity(eqx.Module):
    """Top eigenvalues of the collective kernel and of each layer kernel, with their
    derivatives. Row 0 is `K`, row l is `K_l` (l = 1..L).

    **Fields:** `values` `(L+1, m)` descending; `weights`: tuple over layers of
    `(L+1, m, N_l, N_{l-1})`, `∂λ/∂W_l`; `inputs` `(L+1, m, P, d)`, `∂λ/∂X`; `gains`
    `(L+1, m, L)`, `∂λ/∂g_l` (`None` without gains); `skips`: tuple over layers of
    `(L+1, m)`, `∂λ/∂α_l` (`None` entries for layers without a skip path; `None` without
    skips).
    """

    values: Float[Array, "Lp1 m"]
    weights: tuple[Float[Array, "Lp1 m n_out n_in"], ...]
    inputs: Float[Array, "Lp1 m P d"]
    gains: Float[Array, "Lp1 m L"] | None = None
    skips: tuple | None = None


def eigenvalue_sensitivity(net: ReLUNet, X: Float[Array, "P d"], *, m: int = 1) -> Sensitivity:
    """Spectral sensitivity: derivatives of the top-`m` eigenvalues of `K` and of every layer
    kernel `K_l` (I2; `s_l² G_{l-1} ⊙ Q_l` for a plain layer) with respect to the weights,
    the structure parameters (gains `g_l`, skip strengths `α_l`) and the inputs, by
    reverse-mode autodiff through `layer_kernels` and `eigh` (valid where those eigenvalues
    are simple).

    **Returns:** a `Sensitivity`.
    """
    X, _ = check_inputs(net, X)
    m = _positive_int("m", m)
    return _sensitivity(net, X, m)


@eqx.filter_jit
def _sensitivity(net, X, m):
    diff, rest = eqx.partition(net, trainable(net, every=True))

    def top(diff, X):
        lk = layer_kernels(eqx.combine(diff, rest), X)
        kernels = (lk.total, *lk.K)
        return jnp.stack([jnp.linalg.eigvalsh(flat_kernel(K))[::-1][:m] for K in kernels])

    d_net, d_inputs = jax.jacrev(top, argnums=(0, 1))(diff, X)
    return Sensitivity(values=top(diff, X), weights=tuple(d_net.weights), inputs=d_inputs,
                       gains=d_net.gains, skips=d_net.skips)


class Sharpness(eqx.Module):
    """Top eigenvalues of the Hessian of the loss over the trained parameters.

    **Fields:** `values` `(k,)` descending; `residuals` `(k,)`, `‖H v − λ v‖ / |λ|`.
    """

    values: Float[Array, " k"]
    residuals: Float[Array, " k"]


def sharpness(net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"], *, k: int = 1,
              iters: int = 20, key: PRNGKeyArray | None = None) -> Sharpness:
    """Sharpness: the top-`k` eigenvalues of the Hessian of `L = ½ Σ r²` with respect to the
    trained parameters (the stability threshold of gradient descent is `λ_max < 2/η`), by
    block Krylov iteration on Hessian-vector products (forward-over-reverse autodiff), never
    forming the Hessian. Near a minimum it is `J ᵀJ`, whose top eigenvalue is the kernel's;
    away from it the residual term `Σ_μ r_μ ∇²f_μ` adds.

    **Arguments:** `net`; `X` `(P, d)`; `y`; `k`; `iters`: Krylov blocks; `key`: random start.

    **Returns:** `Sharpness`.
    """
    X, y = check_inputs(net, X, y)
    n = sum(p.size for p in jax.tree.leaves(parameters(net)))
    k, iters = _positive_int("k", k), _positive_int("iters", iters)
    if k > n:
        raise ValueError(f"`k` = {k} exceeds the number of trained parameters, {n}.")
    key = jax.random.key(0) if key is None else key
    return _sharpness(net, X, y, k, iters, key)


@eqx.filter_jit
def _sharpness(net, X, y, k, iters, key):
    flat, unravel = jax.flatten_util.ravel_pytree(parameters(net))
    n = flat.size

    def loss(v):
        f = forward(with_parameters(net, unravel(v)), X)[-1]
        return 0.5 * jnp.sum((f - y) ** 2)

    grad = jax.grad(loss)

    def matmat(V):
        return jax.vmap(lambda v: jax.jvp(grad, (flat,), (v,))[1], in_axes=1, out_axes=1)(V)

    iters = max(1, min(iters, n // (k + 5)))
    if iters * (k + 5) >= n // 2:
        H = jax.hessian(loss)(flat)
        values = jnp.linalg.eigvalsh(H)[::-1][:k]
        return Sharpness(values=values, residuals=jnp.zeros_like(values))
    values, _, residuals = block_krylov_eigs(matmat, n, k, iters=iters, key=key, dtype=flat.dtype)
    return Sharpness(values=values, residuals=residuals)
