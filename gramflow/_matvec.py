"""The collective kernel without forming it: products `K v` and top eigenpairs, for P too large
for a `(P, P)` matrix."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental.sparse.linalg import lobpcg_standard
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_inputs
from ._kernels import collective_kernel
from ._network import ReLUNet
from ._observables import flat_kernel
from ._state import fields, residual_weighted
from ._velocities import local_forward, residual_rate


def _matvec(scales, Z, Delta, v):
    """`K v = −Σ_l Δ_l · V_l(v)` with `V_l(v) = −s_l² Z_{l-1} (Z_{l-1}ᵀ E_l(v))` (I2, I6): the
    residual rate of (I2) with `v` in place of `r`."""
    E = tuple(residual_weighted(v, d) for d in Delta)
    return -residual_rate(Delta, local_forward(scales, Z, E))


def kernel_matvec(
    net: ReLUNet, X: Float[Array, "P d"], v: Float[Array, "P *k"]
) -> Float[Array, "P *k"]:
    """`K v` for the collective kernel `K = Σ_l s_l² G_{l-1} ⊙ Q_l` (I2) without forming K:
    one forward/backward pass for the fields, then per layer one product with `Z_{l-1}ᵀ`
    (a vjp) and one with `Z_{l-1}` (a jvp), O(P Σ_l N_l N_{l-1}) time and O(P Σ_l N_l)
    memory (the Gram order is used instead where it is cheaper, I6).

    **Arguments:** `net`; `X` `(P, d)`; `v` shaped like the residual, `(P,)` or `(P, k)`, or
    with a trailing batch axis, `(P, m)` / `(P, k, m)`, for several vectors at once.

    **Returns:** `K v`, shaped like `v`. For vector outputs
    `(K v)_{μi} = Σ_{νj} K[μ,ν,i,j] v_{νj}`.
    """
    X, _ = check_inputs(net, X)
    P, k = X.shape[0], net.out_dim
    v = jnp.asarray(v, X.dtype)
    single = (P,) if k is None else (P, k)
    if v.shape[: len(single)] != single or v.ndim > len(single) + 1:
        raise ValueError(f"`v` must have shape {single} or {single + ('m',)}, got {v.shape}.")
    _, Z, _, _, Delta, _ = fields(net, X)
    if v.ndim == len(single):
        return _matvec(net.scales, Z, Delta, v)
    return jax.vmap(lambda u: _matvec(net.scales, Z, Delta, u), in_axes=-1, out_axes=-1)(v)


class KernelEigs(eqx.Module):
    """Top eigenpairs of the collective kernel.

    **Fields:** `values` `(m,)` descending; `vectors` `(P, m)` or `(P, k, m)` (orthonormal
    over the flattened `(P·k)` index); `iterations` of LOBPCG (0 for the dense path).
    """

    values: Float[Array, " m"]
    vectors: Float[Array, "P *k m"]
    iterations: Int[Array, ""]


def kernel_eigs(
    net: ReLUNet,
    X: Float[Array, "P d"],
    *,
    k: int = 10,
    iters: int = 100,
    tol: float | None = None,
    key: PRNGKeyArray | None = None,
) -> KernelEigs:
    """Top-`k` eigenvalues and eigenvectors of the collective kernel by LOBPCG
    (`jax.experimental.sparse.linalg.lobpcg_standard`) on `kernel_matvec`: K is never
    formed, so P can be far larger than a `(P, P)` matrix allows. When `5 k ≥ P·k_out`
    (LOBPCG's limit) the dense `jnp.linalg.eigh` of `collective_kernel` is used instead.

    **Arguments:** `net`; `X` `(P, d)`; `k` eigenpairs; `iters`: maximum LOBPCG iterations;
    `tol`: its relative tolerance (default: the dtype's epsilon); `key`: for the random
    start (default `jax.random.key(0)`).

    **Returns:** `KernelEigs`.
    """
    X, _ = check_inputs(net, X)
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    P, kout = X.shape[0], net.out_dim or 1
    n = P * kout
    if k > n:
        raise ValueError(f"`k` = {k} exceeds the kernel's size P·k_out = {n}.")
    shape = (P,) if net.out_dim is None else (P, kout)
    if 5 * k >= n:
        values, vectors = jnp.linalg.eigh(flat_kernel(collective_kernel(net, X)))
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
        return KernelEigs(values, vectors.reshape(*shape, k), jnp.asarray(0))
    _, Z, _, _, Delta, _ = fields(net, X)

    def matmat(V):  # (n, m) -> (n, m)
        U = V.reshape(*shape, V.shape[-1])
        out = jax.vmap(lambda u: _matvec(net.scales, Z, Delta, u), in_axes=-1, out_axes=-1)(U)
        return out.reshape(n, -1)

    key = jax.random.key(0) if key is None else key
    X0 = jax.random.normal(key, (n, k), X.dtype)
    values, vectors, i = lobpcg_standard(matmat, X0, m=iters, tol=tol)
    return KernelEigs(values, vectors.reshape(*shape, k), i)
