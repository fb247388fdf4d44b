"""Field algebra: Grams, co-activations, Hadamard products and masked kernels of per-sample
fields. A leaf module: arrays in, arrays out, nothing of the network.

Layouts (batch-first): fields `Z` `(P, N)`; conjugate fields `Δ` `(P, N)` or, with an output
axis, `(P, k, N)`; kernels `(P, Q)` or `(P, Q, k, k)` (the neural-tangents layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._cost import CostModel
from ._mask import Mask


def gram(Z: Float[Array, "P N"], other: Float[Array, "Q N"] | None = None):
    """Forward Gram `G = Z Zᵀ`, `(P, P)` (or the cross Gram `Z Z'ᵀ`, `(P, Q)`)."""
    return Z @ (Z if other is None else other).T


def gram_apply(A: Float[Array, "P *k n"], B: Float[Array, "P n"], C: Float[Array, "P m"]):
    """`Σ_ν (A_μ · B_ν) C_ν`, shape `(P, *k, m)`: a Gram matrix applied to a field (I6).

    Contracted either as `(A Bᵀ) C` (cost ∝ P² (n + m)) or as `A (Bᵀ C)` (cost ∝ P n m),
    whichever is cheaper for the (static) shapes.
    """
    P, n, m = B.shape[0], B.shape[-1], C.shape[-1]
    if P * (n + m) < 2 * n * m:
        return (A @ B.T) @ C
    return A @ (B.T @ C)


def coactivation(Delta: Float[Array, "P *k N"], other: Float[Array, "Q *k N"] | None = None):
    """Co-activation matrix `Q[μ,ν] = Δ_μ · Δ_ν`: `(P, P)`, or `(P, P, k, k)` with
    `Q[μ,ν,i,j] = Δ[μ,i] · Δ[ν,j]` for vector outputs (cross version with `other`)."""
    other = Delta if other is None else other
    if Delta.ndim == 2:
        return Delta @ other.T
    return jnp.einsum("mia,nja->mnij", Delta, other)


def hadamard(s: Float[Array, ""], G: Float[Array, "P Q"], Q: Float[Array, "P Q *kk"]):
    """`s² G ⊙ Q` (the layer kernel `K_l = s_l² G_{l-1} ⊙ Q_l`), broadcasting `G` over the
    output axes of `Q`."""
    return (s**2) * G.reshape(G.shape + (1,) * (Q.ndim - 2)) * Q


def apply_mask(D: Float[Array, "P N"], B: Float[Array, "P *k N"]) -> Float[Array, "P *k N"]:
    """`D ⊙ B`, broadcasting the mask over any axes between the sample and unit axes."""
    return D.reshape(D.shape[:1] + (1,) * (B.ndim - 2) + D.shape[1:]) * B


def residual_weighted(r: Float[Array, "P *k"], Delta: Float[Array, "P *k N"]) -> Float[Array, "P N"]:
    """`E_l = Σ_i r_{·,i} Δ_l[·, i]` (I8): `diag(r) Δ_l` for scalar output, `(P, N_l)`."""
    if Delta.ndim == 2:
        return r[:, None] * Delta
    return jnp.einsum("pk,pkn->pn", r, Delta)


def outer(u: Float[Array, "P *k"], v: Float[Array, "Q *k"]) -> Float[Array, "P Q *kk"]:
    """`u_μ v_νᵀ` in the kernel layout: `(P, Q)` or `(P, Q, k, k)`."""
    return jnp.outer(u, v) if u.ndim == 1 else jnp.einsum("mi,nj->mnij", u, v)


def unit_sum(D: Float[Array, "P *k N"], x: Float[Array, "P N"]) -> Float[Array, "P *k"]:
    """`Σ_n D[μ, ..., n] x[μ, n]`: a per-sample contraction over units, `(P,)` or `(P, k)`."""
    if D.ndim == 2:
        return jnp.sum(D * x, axis=-1)
    return jnp.einsum("pkn,pn->pk", D, x)


def dense_trace(c: Float[Array, ""], z: Float[Array, "P n"], d: Float[Array, "P *k N"]):
    """`tr(c² G ⊙ Q) = c² Σ_μ ‖z_μ‖² ‖Δ_μ‖²` (summed over outputs), O(P N)."""
    return c**2 * jnp.sum(jnp.sum(z**2, -1) * jnp.sum((d**2).reshape(d.shape[0], -1), -1))


def flat_kernel(K: Float[Array, "P Q *kk"]) -> Float[Array, "Pk Qk"]:
    """`(P, Q, k, k)` → `(P·k, Q·k)` with row index `μ·k + i`, matching `r.reshape(-1)`."""
    if K.ndim == 2:
        return K
    P, Q, k = K.shape[0], K.shape[1], K.shape[2]
    return K.transpose(0, 2, 1, 3).reshape(P * k, Q * k)


def apply_kernel(K: Float[Array, "P P *kk"], v: Float[Array, "P *k"]) -> Float[Array, "P *k"]:
    """`(K v)_{μi} = Σ_{νj} K[μ,ν,i,j] v_{νj}` for either kernel layout."""
    if K.ndim == 2:
        return K @ v
    return jnp.einsum("mnij,nj->mi", K, v)


def transpose_samples(K: Float[Array, "P Q *kk"]) -> Float[Array, "Q P *kk"]:
    """`K[ν, μ, j, i]` from `K[μ, ν, i, j]`: the transpose of the flattened kernel."""
    return K.T if K.ndim == 2 else K.transpose(1, 0, 3, 2)


# -- masked kernels ------------------------------------------------------------------------------

def masked_kernel(mask: Mask, Zi, Di, Zj, Dj, cost: CostModel):
    """`Σ_{i,j} M[i,j] Δ_i[μ,·,i] Δ_j[ν,·,i] Z_i[μ,j] Z_j[ν,j]` from the fields, no autodiff,
    in whichever of two exact forms `cost` says is cheaper for the (static) mask:

    - Hadamard form: `Σ_b (Z_{C_b} Z'_{C_b}ᵀ) ⊙ (Δ_{R_b} Δ'_{R_b}ᵀ)` over the bicliques of the
      mask, O(P² Σ_b (|R_b| + |C_b|)) — few large blocks (block-diagonal pathways);
    - connection form: `Σ_c A_c A'_cᵀ` with one column per connection,
      `A[μ, (i,j)] = Δ[μ,i] Z[μ,j]`, in chunks of connections, O(P² nnz) as large matrix
      products — many small blocks (banded, random sparse).

    Shape `(P, Q)` or `(P, Q, k, k)`."""
    nnz = int(mask.array.sum())
    nb = len(mask.bicliques)
    overhead = cost.biclique_overhead if nb <= cost.unrolled_bicliques else cost.chunked_overhead
    biclique_cost = sum(cost.biclique_gram * (len(r) + len(c)) + overhead
                        for r, c in mask.bicliques)
    if nnz < biclique_cost:
        return _connection_kernel(mask, Zi, Di, Zj, Dj, cost)
    return _biclique_kernel(mask, Zi, Di, Zj, Dj, cost)


def _pad_unit(x):
    """Append a zero unit (index N) along the last axis, the target of padded indices."""
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, 1),))


def _connection_kernel(mask: Mask, Zi, Di, Zj, Dj, cost: CostModel):
    rows, cols = np.nonzero(mask.array)
    P, Q = Zi.shape[0], Zj.shape[0]
    kk = 1 if Di.ndim == 2 else Di.shape[1]
    ch = int(max(1, min(rows.size, cost.chunk_elements // ((P + Q) * kk))))
    pad = -rows.size % ch
    Zi, Zj, Di, Dj = (_pad_unit(x) for x in (Zi, Zj, Di, Dj))
    rows = np.concatenate([rows, np.full(pad, Di.shape[-1] - 1)]).reshape(-1, ch)
    cols = np.concatenate([cols, np.full(pad, Zi.shape[-1] - 1)]).reshape(-1, ch)

    def block(r, c):
        return coactivation(apply_mask(Zi[:, c], Di[..., r]), apply_mask(Zj[:, c], Dj[..., r]))

    if rows.shape[0] == 1:
        return block(rows[0], cols[0])

    def step(acc, rc):
        return acc + block(*rc), None

    zero = jnp.zeros((P, Q) + ((kk, kk) if Di.ndim == 3 else ()), Zi.dtype)
    return jax.lax.scan(step, zero, (jnp.asarray(rows), jnp.asarray(cols)))[0]


def _take(x, idx: np.ndarray):
    """`x[..., idx]` for static indices: a slice when they are contiguous."""
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return x[..., int(idx[0]):int(idx[0]) + idx.size]
    return x[..., idx]


def _biclique_groups(mask: Mask):
    """Bicliques grouped by size: a list of `(rows (n_b, r), cols (n_b, c))` index arrays."""
    groups: dict = {}
    for r, c in mask.bicliques:
        groups.setdefault((len(r), len(c)), []).append((r, c))
    return [(np.stack([r for r, _ in g]), np.stack([c for _, c in g])) for g in groups.values()]


def _biclique_kernel(mask: Mask, Zi, Di, Zj, Dj, cost: CostModel):
    one = jnp.ones((), Zi.dtype)
    if len(mask.bicliques) <= cost.unrolled_bicliques:
        return sum(hadamard(one, gram(_take(Zi, c), _take(Zj, c)),
                            coactivation(_take(Di, r), _take(Dj, r)))
                   for r, c in mask.bicliques)
    P, Q = Zi.shape[0], Zj.shape[0]
    kk = 1 if Di.ndim == 2 else Di.shape[1] ** 2
    Zi, Zj, Di, Dj = (_pad_unit(x) for x in (Zi, Zj, Di, Dj))
    n_in, n_out = Zi.shape[-1] - 1, Di.shape[-1] - 1
    total = 0
    for rows, cols in _biclique_groups(mask):
        n_b = rows.shape[0]
        ch = int(max(1, min(n_b, cost.chunk_elements // (P * Q * kk))))
        pad = -n_b % ch
        rows = np.concatenate([rows, np.full((pad, rows.shape[1]), n_out)]).reshape(-1, ch, rows.shape[1])
        cols = np.concatenate([cols, np.full((pad, cols.shape[1]), n_in)]).reshape(-1, ch, cols.shape[1])

        def block(rc):
            r, c = rc
            return hadamard(one, gram(Zi[:, c], Zj[:, c]), coactivation(Di[..., r], Dj[..., r]))

        def chunk(acc, rc):
            return acc + jnp.sum(jax.vmap(block)(rc), axis=0), None

        zero = jnp.zeros((P, Q) + ((Di.shape[1],) * 2 if kk > 1 else ()), Zi.dtype)
        if rows.shape[0] == 1:
            total = total + chunk(zero, (rows[0], cols[0]))[0]
        else:
            total = total + jax.lax.scan(chunk, zero, (jnp.asarray(rows), jnp.asarray(cols)))[0]
    return total
