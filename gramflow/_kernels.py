"""Layer-wise kernels `K_l = s_l² G_{l-1} ⊙ Q_l` and the collective kernel (I2, I3)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_inputs
from ._network import ReLUNet
from ._state import fields


def gram(Z: Float[Array, "P N"]) -> Float[Array, "P P"]:
    """Forward Gram `G = Z Zᵀ`, `(P, P)`."""
    return Z @ Z.T


def gram_apply(A: Float[Array, "P *k n"], B: Float[Array, "P n"], C: Float[Array, "P m"]):
    """`Σ_ν (A_μ · B_ν) C_ν`, shape `(P, *k, m)`: a Gram matrix applied to a field (I6).

    Contracted either as `(A Bᵀ) C` (cost ∝ P² (n + m)) or as `A (Bᵀ C)` (cost ∝ P n m),
    whichever is cheaper for the (static) shapes.
    """
    P, n, m = B.shape[0], B.shape[-1], C.shape[-1]
    if P * (n + m) < 2 * n * m:
        return (A @ B.T) @ C
    return A @ (B.T @ C)


def coactivation(Delta: Float[Array, "P *k N"]) -> Float[Array, "P P *kk"]:
    """Co-activation matrix `Q[μ,ν] = Δ_μ · Δ_ν`: `(P, P)`, or `(P, P, k, k)` with
    `Q[μ,ν,i,j] = Δ[μ,i] · Δ[ν,j]` for vector outputs."""
    if Delta.ndim == 2:
        return Delta @ Delta.T
    return jnp.einsum("mia,nja->mnij", Delta, Delta)


def hadamard(s: Float[Array, ""], G: Float[Array, "P P"], Q: Float[Array, "P P *kk"]):
    """`K_l = s_l² G_{l-1} ⊙ Q_l`, broadcasting `G` over the output axes of `Q`."""
    return (s**2) * G.reshape(G.shape + (1,) * (Q.ndim - 2)) * Q


class LayerKernels(eqx.Module):
    """The layer-wise decomposition of the collective kernel (I2).

    **Fields** (tuples over layers, l = 1..L):

    - `G`: forward Grams `G_0 = X Xᵀ, G_1, ..., G_{L-1}`, each `(P, P)`.
    - `Q`: co-activation matrices `Q_1..Q_L`, `Q_l = Δ_l Δ_lᵀ`: `(P, P)` or `(P, P, k, k)`.
    - `K`: per-layer kernels `K_l = s_l² G_{l-1} ⊙ Q_l`, shaped like `Q_l`.
    - `total`: `K = Σ_l K_l`, the empirical NTK over the hidden weights.
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
    K = tuple(hadamard(s, g, q) for s, g, q in zip(net.scales[:-1], G, Q))
    return LayerKernels(G=G, Q=Q, K=K, total=sum(K[1:], K[0]))


def collective_kernel(net: ReLUNet, X: Float[Array, "P d"]) -> Float[Array, "P P *kk"]:
    """The collective kernel `K = Σ_l s_l² G_{l-1} ⊙ Q_l` (I2), equal to `J Jᵀ` with
    `J = ∂f/∂(W_1..W_L)`.

    **Arguments:** `net`; `X` of shape `(P, d)`.

    **Returns:** `K` of shape `(P, P)` (scalar output) or `(P, P, k, k)` (vector outputs).
    """
    X, _ = check_inputs(net, X)
    _, Z, _, _, Delta, _ = fields(net, X)
    terms = (
        hadamard(s, gram(z), coactivation(d)) for s, z, d in zip(net.scales[:-1], Z, Delta)
    )
    return sum(terms)


def apply_kernel(K: Float[Array, "P P *kk"], v: Float[Array, "P *k"]) -> Float[Array, "P *k"]:
    """`(K v)_{μi} = Σ_{νj} K[μ,ν,i,j] v_{νj}` for either kernel layout."""
    if K.ndim == 2:
        return K @ v
    return jnp.einsum("mnij,nj->mi", K, v)
