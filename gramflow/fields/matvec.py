"""The collective kernel without forming it: products `K v` and top eigenpairs, for P too large
for a `(P, P)` matrix."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._algebra import flat_kernel
from ..model.network import ReLUNet, check_inputs
from .kernels import collective_kernel
from .state import fields


def _kernel_matmat(net, Z, Delta, V):
    """`K V = Σ_l K_l V` for a block of vectors `V` `(P, *k, m)` (`Layer.matmat`)."""
    return sum(layer.matmat(z, d, V) for layer, z, d in zip(net.layers, Z, Delta))


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
        return _kernel_matmat(net, Z, Delta, v[..., None])[..., 0]
    return _kernel_matmat(net, Z, Delta, v)


class KernelEigs(eqx.Module):
    """Top eigenpairs of the collective kernel.

    **Fields:** `values` `(m,)` descending; `vectors` `(P, m)` or `(P, k, m)` (orthonormal
    over the flattened `(P·k)` index); `residuals` `(m,)`, `‖K v − λ v‖ / λ` of each pair
    (0 for the dense path); `iterations`: block-Krylov iterations (0 for the dense path).
    """

    values: Float[Array, " m"]
    vectors: Float[Array, "P *k m"]
    residuals: Float[Array, " m"]
    iterations: Int[Array, ""]


def _orthogonalize(W, Qs):
    """`W` minus its projection on every stored block (classical Gram–Schmidt, twice)."""
    for _ in range(2):
        W = W - jnp.einsum("inb,ibc->nc", Qs, jnp.einsum("inb,nc->ibc", Qs, W))
    return W


def block_krylov_eigs(matmat, n: int, k: int, *, iters: int, key, dtype, oversample: int = 5):
    """Top-k eigenpairs of a symmetric PSD operator by randomized block Krylov iteration
    (block Lanczos with full reorthogonalization; Musco & Musco, NeurIPS 2015): the basis
    `[Q, A Q, A² Q, …]` of `iters` blocks of `k + oversample` columns, one product with A per
    block, then Rayleigh–Ritz. Returns `(values, vectors, residuals)`."""
    b = k + oversample
    Q0, _ = jnp.linalg.qr(matmat(jax.random.normal(key, (n, b), dtype)))

    def body(i, carry):
        Qs, AQs, Q = carry
        AQ = matmat(Q)
        Qs, AQs = Qs.at[i].set(Q), AQs.at[i].set(AQ)
        Q, _ = jnp.linalg.qr(_orthogonalize(AQ, Qs))
        # Once the Krylov space is (numerically) exhausted the QR above normalizes noise;
        # orthogonalizing its result again keeps the whole basis orthonormal.
        Q, _ = jnp.linalg.qr(_orthogonalize(Q, Qs))
        return Qs, AQs, Q

    zeros = jnp.zeros((iters, n, b), dtype)
    Qs, AQs, _ = jax.lax.fori_loop(0, iters, body, (zeros, zeros, Q0))
    Q = Qs.transpose(1, 0, 2).reshape(n, iters * b)
    AQ = AQs.transpose(1, 0, 2).reshape(n, iters * b)
    T = Q.T @ AQ
    theta, Y = jnp.linalg.eigh(0.5 * (T + T.T))
    theta, Y = theta[::-1][:k], Y[:, ::-1][:, :k]
    V, AV = Q @ Y, AQ @ Y
    residuals = jnp.linalg.norm(AV - V * theta[None, :], axis=0) / jnp.abs(theta)
    return theta, V, residuals


def kernel_eigs(
    net: ReLUNet,
    X: Float[Array, "P d"],
    *,
    k: int = 10,
    iters: int = 16,
    key: PRNGKeyArray | None = None,
) -> KernelEigs:
    """Top-`k` eigenvalues and eigenvectors of the collective kernel, never forming K: a
    randomized block Krylov iteration (`block_krylov_eigs`) on the block product of
    `kernel_matvec`, O(iters · (k + 5) · P Σ_l N_l N_{l-1}) time and O(iters · k · P) memory.
    When the Krylov basis would span most of the space (`iters·(k+5) ≥ P·k_out / 2`), the
    dense `jnp.linalg.eigh` of `collective_kernel` is used instead. Check `residuals`:
    clustered eigenvalues converge more slowly; raise `iters` if they are not small.

    **Arguments:** `net`; `X` `(P, d)`; `k` eigenpairs; `iters`: Krylov blocks; `key`: for the
    random start (default `jax.random.key(0)`).

    **Returns:** `KernelEigs`.
    """
    X, _ = check_inputs(net, X)
    for name, value in [("k", k), ("iters", iters)]:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    P, kout = X.shape[0], net.out_dim or 1
    n = P * kout
    if k > n:
        raise ValueError(f"`k` = {k} exceeds the kernel's size P·k_out = {n}.")
    shape = (P,) if net.out_dim is None else (P, kout)
    if 2 * iters * (k + 5) >= n:
        values, vectors = jnp.linalg.eigh(flat_kernel(collective_kernel(net, X)))
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
        zero = jnp.zeros((k,), values.dtype)
        return KernelEigs(values, vectors.reshape(*shape, k), zero, jnp.asarray(0))
    key = jax.random.key(0) if key is None else key
    return _krylov_eigs(net, X, key, k, iters)


@eqx.filter_jit
def _krylov_eigs(net, X, key, k: int, iters: int) -> KernelEigs:
    """The block-Krylov path of `kernel_eigs`, compiled once per shape (an eager call would
    otherwise trace its loop again every time)."""
    P, kout = X.shape[0], net.out_dim or 1
    n = P * kout
    shape = (P,) if net.out_dim is None else (P, kout)
    _, Z, _, _, Delta, _ = fields(net, X)

    def matmat(V):  # (n, m) -> (n, m)
        return _kernel_matmat(net, Z, Delta, V.reshape(*shape, V.shape[-1])).reshape(n, -1)

    values, vectors, residuals = block_krylov_eigs(matmat, n, k, iters=iters, key=key,
                                                   dtype=X.dtype)
    return KernelEigs(values, vectors.reshape(*shape, k), residuals, jnp.asarray(iters))
