"""Layer-wise kernels `K_l = s_l² G_{l-1} ⊙ Q_l` and the collective kernel (I2, I3)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_inputs
from ._network import ReLUNet
from ._state import fields
from ._structure import local_kernels


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


def hadamard(s: Float[Array, ""], G: Float[Array, "P P"], Q: Float[Array, "P P *kk"]):
    """`K_l = s_l² G_{l-1} ⊙ Q_l`, broadcasting `G` over the output axes of `Q`."""
    return (s**2) * G.reshape(G.shape + (1,) * (Q.ndim - 2)) * Q


class LayerKernels(eqx.Module):
    """The layer-wise decomposition of the collective kernel (I2).

    **Fields** (tuples over layers, l = 1..L):

    - `G`: forward Grams `G_0 = X Xᵀ, G_1, ..., G_{L-1}`, each `(P, P)`.
    - `Q`: co-activation matrices `Q_1..Q_L`, `Q_l = Δ_l Δ_lᵀ`: `(P, P)` or `(P, P, k, k)`.
    - `K`: per-layer kernels `K_l = s_l² G_{l-1} ⊙ Q_l`, shaped like `Q_l`. For a structured
      layer, `K_l = J_{θ_l} J_{θ_l}ᵀ` over all its trained parameters θ_l: the masked
      weight term `(g_l s_l)² Σ_b (G_{l-1})_{C_b} ⊙ (Q_l)_{R_b}` over the bicliques of the
      mask, plus rank-one terms for a trained gain and a trained skip (see `ReLUNet`).
    - `total`: `K = Σ_l K_l`, the empirical NTK over the trained parameters.
    """

    G: tuple[Float[Array, "P P"], ...]
    Q: tuple[Float[Array, "P P *kk"], ...]
    K: tuple[Float[Array, "P P *kk"], ...]
    total: Float[Array, "P P *kk"]


def layer_kernels(net: ReLUNet, X: Float[Array, "P d"]) -> LayerKernels:
    """Per-layer kernels `K_l = s_l² G_{l-1} ⊙ Q_l` and their sum (I2; for L = 1, I3).

    Cost O(P² Σ_l N_l) after one forward and one pullback pass; no Jacobian is formed.

    **Arguments:** `net`; `X` of shape `(P, d)`.

    **Returns:** a `LayerKernels`; kernels are `(P, P)` for scalar output and `(P, P, k, k)`
    for vector outputs (the neural-tangents layout), so that
    `dr_{μi}/dt = −η Σ_{νj} K[μ,ν,i,j] r_{νj}`.
    """
    X, _ = check_inputs(net, X)
    _, Z, _, _, Delta, _ = fields(net, X)
    G = tuple(gram(z) for z in Z[:-1])
    Q = tuple(coactivation(d) for d in Delta)
    if net.structured:
        K = local_kernels(net, Z[:-1], Delta)
    else:
        K = tuple(hadamard(s, g, q) for s, g, q in zip(net.scales[:-1], G, Q))
    return LayerKernels(G=G, Q=Q, K=K, total=sum(K[1:], K[0]))


def collective_kernel(
    net: ReLUNet, X: Float[Array, "P d"], *, block_size: int | None = None
) -> Float[Array, "P P *kk"]:
    """The collective kernel `K = Σ_l s_l² G_{l-1} ⊙ Q_l` (I2), equal to `J Jᵀ` with
    `J = ∂f/∂(W_1..W_L)`.

    **Arguments:** `net`; `X` of shape `(P, d)`; `block_size`: fill K in tiles of
    `block_size` samples, recomputing the fields of two blocks per tile, for when the
    `(P, P)` kernel fits in memory but the fields `(P, Σ N_l)` of all samples do not
    (default `None`: one pass over all samples). For products `K v` or the top spectrum
    without forming K at all, see `kernel_matvec` and `kernel_eigs`.

    **Returns:** `K` of shape `(P, P)` (scalar output) or `(P, P, k, k)` (vector outputs).
    """
    X, _ = check_inputs(net, X)
    if block_size is None:
        _, Z, _, _, Delta, _ = fields(net, X)
        if _use_triangle(X.shape[0], net):
            return _symmetric_kernel(net, Z, Delta, _TRIANGLE_BLOCK)
        return _kernel_tile(net, Z, Delta, Z, Delta)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
    P = X.shape[0]
    nb = -(-P // block_size)
    Xb = jnp.pad(X, ((0, nb * block_size - P), (0, 0))).reshape(nb, block_size, -1)

    def block_fields(x):
        _, Z, _, _, Delta, _ = fields(net, x)
        return Z, Delta

    def row(xi):
        Zi, Di = block_fields(xi)

        def tile(xj):
            Zj, Dj = block_fields(xj)
            return _kernel_tile(net, Zi, Di, Zj, Dj)

        return jax.lax.map(tile, Xb)

    tiles = jax.lax.map(row, Xb)  # (nb, nb, b, b, *kk)
    K = jnp.moveaxis(tiles, 2, 1).reshape(nb * block_size, nb * block_size, *tiles.shape[4:])
    return K[:P, :P]


_TRIANGLE_BLOCK = 512


def _use_triangle(P: int, net) -> bool:
    """Block-triangular Gram products pay off when P spans several blocks and the layers are
    wide enough for the halved matmuls to outweigh assembling K (measured on CPU: a gain at
    widths 3 × 1024, a loss at 3 × 256, for P = 2048; see benchmarks/README.md)."""
    sizes = (net.in_dim, *net.widths)
    mean_gram_width = sum(a + b for a, b in zip(sizes[:-1], sizes[1:])) / net.depth
    return P >= 2 * _TRIANGLE_BLOCK and mean_gram_width >= 1000


def _transpose_samples(K):
    """`K[ν, μ, j, i]` from `K[μ, ν, i, j]`: the transpose of the flattened kernel."""
    return K.T if K.ndim == 2 else K.transpose(1, 0, 3, 2)


def _symmetric_kernel(net, Z, Delta, block):
    """K from its block-upper triangle: block row i holds the tiles (i, j ≥ i), so the Gram
    products cost about half of the full ones; the rest is the transpose (K is symmetric)."""
    P = Z[0].shape[0]
    nb = -(-P // block)
    pad = nb * block - P
    Z = tuple(jnp.pad(z, ((0, pad), (0, 0))) for z in Z)
    Delta = tuple(jnp.pad(d, ((0, pad),) + ((0, 0),) * (d.ndim - 1)) for d in Delta)
    n = nb * block
    diag, upper = [], []
    for i in range(nb):
        lo, hi = i * block, (i + 1) * block
        row = _kernel_tile(net, tuple(z[lo:hi] for z in Z), tuple(d[lo:hi] for d in Delta),
                           tuple(z[lo:] for z in Z), tuple(d[lo:] for d in Delta))
        diag.append(row[:, :block])
        upper.append(row[:, block:])
    out_shape = (n, n) + diag[0].shape[2:]
    S = jnp.zeros(out_shape, diag[0].dtype)
    for i in range(nb - 1):
        S = S.at[i * block:(i + 1) * block, (i + 1) * block:].set(upper[i])
    D = jnp.zeros(out_shape, diag[0].dtype)
    for i in range(nb):
        D = D.at[i * block:(i + 1) * block, i * block:(i + 1) * block].set(diag[i])
    K = D + S + _transpose_samples(S)
    return K[:P, :P]


def _kernel_tile(net, Zi, Di, Zj, Dj):
    """`Σ_l s_l² (Z_{l-1,i} Z_{l-1,j}ᵀ) ⊙ (Δ_{l,i} Δ_{l,j}ᵀ)` between two sets of samples
    (the structured terms of `local_kernels` for a structured network)."""
    if net.structured:
        return sum(local_kernels(net, Zi[:-1], Di, Zj[:-1], Dj))
    scales = net.scales
    terms = (
        hadamard(s, gram(zi, zj), coactivation(di, dj))
        for s, zi, di, zj, dj in zip(scales[:-1], Zi, Di, Zj, Dj)
    )
    return sum(terms)


def apply_kernel(K: Float[Array, "P P *kk"], v: Float[Array, "P *k"]) -> Float[Array, "P *k"]:
    """`(K v)_{μi} = Σ_{νj} K[μ,ν,i,j] v_{νj}` for either kernel layout."""
    if K.ndim == 2:
        return K @ v
    return jnp.einsum("mnij,nj->mi", K, v)
