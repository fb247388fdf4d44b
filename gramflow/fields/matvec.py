"""The collective kernel without forming it: products `K v` and top eigenpairs, for P too large
for a `(P, P)` matrix."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._algebra import flat_kernel
from ..model.network import ReLUNet, check_inputs
from .kernels import collective_kernel
from .state import fields


def _kernel_matmat(net, Z, Delta, V, block_size=None):
    """`K V = Σ_l K_l V` for a block of vectors `V` `(P, *k, m)` (`Layer.matmat`, in blocks
    of samples when P is large)."""
    return sum(layer.matmat(z, d, V, block_size=block_size)
               for layer, z, d in zip(net.layers, Z, Delta))


def _sample_sharding(X) -> NamedSharding | None:
    """The sharding of `X` if it is a concrete array sharded along its sample axis only
    (`NamedSharding(mesh, PartitionSpec(axes))`), else `None` (one device, replicated, or
    traced). Results along samples are then constrained to the same sharding."""
    if not isinstance(X, jax.Array) or isinstance(X, jax.core.Tracer):
        return None
    sharding = X.sharding
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (X.ndim - len(sharding.spec))
    if spec[0] is None or any(s is not None for s in spec[1:]):
        return None
    return sharding


def _constrain(sharding, x, axis: int = 0):
    """`x` with its axis `axis` (a sample axis) sharded like the samples (no-op without)."""
    if sharding is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = sharding.spec[0]
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(sharding.mesh, PartitionSpec(*spec)))


def kernel_matvec(
    net: ReLUNet, X: Float[Array, "P d"], v: Float[Array, "P *k"], *,
    block_size: int | None = None,
) -> Float[Array, "P *k"]:
    """`K v` for the collective kernel `K = Σ_l s_l² G_{l-1} ⊙ Q_l` (I2) without forming K:
    one forward/backward pass for the fields, then per layer one product with `Z_{l-1}ᵀ`
    (a vjp) and one with `Z_{l-1}` (a jvp), O(P Σ_l N_l N_{l-1}) time and O(P Σ_l N_l)
    memory (the Gram order is used instead where it is cheaper, I6). For large P the
    products run over blocks of samples (`Layer.matmat`), so that no `(P, m, N_l)`
    intermediate is formed: memory O(P Σ_l N_l + block · m · N_l).

    With `X` sharded along its sample axis (`jax.sharding.NamedSharding(mesh,
    PartitionSpec("samples"))`, over the devices of one or several processes), the result is
    sharded the same way; only `(N_{l-1}, m N_l)` matrices are summed across devices.

    **Arguments:** `net`; `X` `(P, d)`; `v` shaped like the residual, `(P,)` or `(P, k)`, or
    with a trailing batch axis, `(P, m)` / `(P, k, m)`, for several vectors at once;
    `block_size`: samples per block (default `None`: one block up to
    `MATMAT_BLOCK_ELEMENTS` entries of `(P, m, N_l)`, then blocks below that).

    **Returns:** `K v`, shaped like `v`. For vector outputs
    `(K v)_{μi} = Σ_{νj} K[μ,ν,i,j] v_{νj}`.
    """
    X, _ = check_inputs(net, X)
    P, k = X.shape[0], net.out_dim
    v = jnp.asarray(v, X.dtype)
    single = (P,) if k is None else (P, k)
    if v.shape[: len(single)] != single or v.ndim > len(single) + 1:
        raise ValueError(f"`v` must have shape {single} or {single + ('m',)}, got {v.shape}.")
    _check_block_size(block_size)
    return _matvec(net, X, v, block_size, _sample_sharding(X))


def _check_block_size(block_size):
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"`block_size` must be a positive int or None, got {block_size!r}.")


@eqx.filter_jit
def _matvec(net, X, v, block_size, sharding):
    """`kernel_matvec` after validation, compiled once per shape."""
    _, Z, _, _, Delta, _ = fields(net, X)
    single = v.ndim == (1 if net.out_dim is None else 2)
    V = v[..., None] if single else v
    KV = _constrain(sharding, _kernel_matmat(net, Z, Delta, V, block_size))
    return KV[..., 0] if single else KV


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


def _orthonormalize(W):
    """Orthonormal columns spanning `W` `(n, b)` from its `(b, b)` Gram alone, three passes of
    `W ← W U Λ^{-1/2}` with `WᵀW = U Λ Uᵀ` (SVQB; Stathopoulos & Wu, SIAM J. Sci. Comput.
    2002): only `WᵀW` is reduced over the rows, so a sharded `W` is never gathered. Eigenvalues
    below `b ε max Λ` are clamped there, so (numerically) dependent columns come out small
    instead of amplified noise (they add only ≈ 0 Ritz values); the later passes restore
    orthonormality to rounding after an ill-conditioned first one."""
    b = W.shape[1]
    eps = jnp.finfo(W.dtype).eps
    for _ in range(3):
        G = W.T @ W
        lam, U = jnp.linalg.eigh(0.5 * (G + G.T))
        floor = b * eps * jnp.maximum(lam[-1], jnp.finfo(W.dtype).tiny)
        W = W @ (U / jnp.sqrt(jnp.maximum(lam, floor))[None, :])
    return W


def block_krylov_eigs(matmat, n: int, k: int, *, iters: int, key, dtype, oversample: int = 5,
                      constrain=None):
    """Top-k eigenpairs of a symmetric PSD operator by randomized block Krylov iteration
    (block Lanczos with full reorthogonalization; Musco & Musco, NeurIPS 2015): the basis
    `[Q, A Q, A² Q, …]` of `iters` blocks of `k + oversample` columns, one product with A per
    block, then Rayleigh–Ritz. Returns `(values, vectors, residuals)`.

    Only reductions over the n rows to small matrices are used (Gram–Schmidt coefficients,
    Cholesky QR, the Rayleigh quotient), so rows sharded over devices stay where they are;
    `constrain(x, axis)` (default: none) pins the sharding of each `(…, n, …)` array."""
    constrain = (lambda x, axis: x) if constrain is None else constrain
    b = k + oversample
    start = constrain(jax.random.normal(key, (n, b), dtype), 0)
    Q0 = constrain(_orthonormalize(matmat(start)), 0)

    def body(i, carry):
        Qs, AQs, Q = carry
        AQ = constrain(matmat(Q), 0)
        Qs, AQs = constrain(Qs.at[i].set(Q), 1), constrain(AQs.at[i].set(AQ), 1)
        Q = _orthonormalize(_orthogonalize(AQ, Qs))
        # Once the Krylov space is (numerically) exhausted the step above normalizes noise;
        # orthogonalizing its result again keeps the whole basis orthonormal.
        Q = constrain(_orthonormalize(_orthogonalize(Q, Qs)), 0)
        return Qs, AQs, Q

    zeros = constrain(jnp.zeros((iters, n, b), dtype), 1)
    Qs, AQs, _ = jax.lax.fori_loop(0, iters, body, (zeros, zeros, Q0))
    T = jnp.einsum("inb,jnc->ibjc", Qs, AQs).reshape(iters * b, iters * b)
    theta, Y = jnp.linalg.eigh(0.5 * (T + T.T))
    theta, Y = theta[::-1][:k], Y[:, ::-1][:, :k].reshape(iters, b, k)
    V = constrain(jnp.einsum("inb,ibc->nc", Qs, Y), 0)
    AV = constrain(jnp.einsum("inb,ibc->nc", AQs, Y), 0)
    residuals = jnp.linalg.norm(AV - V * theta[None, :], axis=0) / jnp.abs(theta)
    return theta, V, residuals


def kernel_eigs(
    net: ReLUNet,
    X: Float[Array, "P d"],
    *,
    k: int = 10,
    iters: int = 16,
    key: PRNGKeyArray | None = None,
    block_size: int | None = None,
) -> KernelEigs:
    """Top-`k` eigenvalues and eigenvectors of the collective kernel, never forming K: a
    randomized block Krylov iteration (`block_krylov_eigs`) on the block product of
    `kernel_matvec`, O(iters · (k + 5) · P Σ_l N_l N_{l-1}) time and O(iters · k · P) memory.
    When the Krylov basis would span most of the space (`iters·(k+5) ≥ P·k_out / 2`), the
    dense `jnp.linalg.eigh` of `collective_kernel` is used instead. Check `residuals`:
    clustered eigenvalues converge more slowly; raise `iters` if they are not small.

    With `X` sharded along its sample axis (a `NamedSharding` of a `jax.sharding.Mesh`), the
    Krylov basis and the eigenvectors stay sharded the same way: the iteration only reduces
    over samples to small matrices (Gram–Schmidt coefficients, Cholesky QR, the Rayleigh
    quotient), and the eigenvectors come back sharded along samples.

    **Arguments:** `net`; `X` `(P, d)`; `k` eigenpairs; `iters`: Krylov blocks; `key`: for the
    random start (default `jax.random.key(0)`); `block_size`: samples per block of the kernel
    products (`kernel_matvec`).

    **Returns:** `KernelEigs`.
    """
    X, _ = check_inputs(net, X)
    _check_block_size(block_size)
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
        vectors = _constrain(_sample_sharding(X), vectors.reshape(*shape, k))
        return KernelEigs(values, vectors, zero, jnp.asarray(0))
    key = jax.random.key(0) if key is None else key
    return _krylov_eigs(net, X, key, k, iters, block_size, _sample_sharding(X))


@eqx.filter_jit
def _krylov_eigs(net, X, key, k: int, iters: int, block_size, sharding) -> KernelEigs:
    """The block-Krylov path of `kernel_eigs`, compiled once per shape (an eager call would
    otherwise trace its loop again every time)."""
    P, kout = X.shape[0], net.out_dim or 1
    n = P * kout
    shape = (P,) if net.out_dim is None else (P, kout)
    _, Z, _, _, Delta, _ = fields(net, X)

    def matmat(V):  # (n, m) -> (n, m)
        V = V.reshape(*shape, V.shape[-1])
        return _kernel_matmat(net, Z, Delta, V, block_size).reshape(n, -1)

    values, vectors, residuals = block_krylov_eigs(
        matmat, n, k, iters=iters, key=key, dtype=X.dtype,
        constrain=lambda x, axis: _constrain(sharding, x, axis))
    vectors = _constrain(sharding, vectors.reshape(*shape, k))
    return KernelEigs(values, vectors, residuals, jnp.asarray(iters))
