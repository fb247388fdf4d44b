"""Field velocities under gradient flow: (I2) for r, (I4)/(I6) for H, (I5) for B."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_inputs
from ._kernels import gram_apply
from ._network import ReLUNet
from ._state import apply_mask, fields, pullback, residual_weighted


class Velocities(eqx.Module):
    """Time derivatives of the fields under gradient flow `dW_l/dt = −η ∂L/∂W_l` with η = 1
    and `L = ½ Σ r²` (multiply by η for another learning rate).

    **Fields:**

    - `r`: `dr/dt = −K r` (I2), shape `(P,)` or `(P, k)`.
    - `H`: tuple of `dH_l/dt` (I4), each `(P, N_l)`.
    - `B`: tuple of `dB_l/dt` (I5), each `(P, N_l)` or `(P, k, N_l)`; `dB_L/dt = 0` because
      the readout is fixed.
    """

    r: Float[Array, "P *k"]
    H: tuple[Float[Array, "P N"], ...]
    B: tuple[Float[Array, "P *k N"], ...]


def local_forward(scales, Z, E):
    """Layer-local forward velocities `V_k = −s_k² G_{k-1} E_k` (the k = l terms of I4),
    `(P, N_k)`: the change of `H_k` caused by the change of `W_k` alone."""
    return tuple(-(s**2) * gram_apply(z, z, e) for s, z, e in zip(scales[:-1], Z, E))


def pushforward(scales, weights, D, V, *, transport: int | None = None):
    """`dH_l/dt = Σ_{k≤l} J^h_{l←k} V_k` (I4) applied matrix-free (I6).

    `Σ_ν c_{μν} 𝔊^{k→l}_{μν} Δ_{l,ν} = J^h_{l←k,μ} (Σ_ν c_{μν} Δ_{k,ν})`, so each source `V_k`
    is pushed up one layer at a time by `J^h_{l←l-1} = s_l W_l D_{l-1}`, O(P N²) per layer.
    `transport=n` keeps only the terms with `l − k ≤ n` (`None`: all, exact). Only
    `W_2..W_L` are used.
    """
    out, contrib = [], []  # contrib[j]: the source V_{l-j} carried up to layer l
    for l, v in enumerate(V):
        if l == 0:
            contrib = [v]
        else:
            W, s, Dm = weights[l], scales[l], D[l - 1]
            kept = [out[-1]] if transport is None else contrib[:transport]
            contrib = [v] + [s * ((Dm * p) @ W.T) for p in kept]
        out.append(sum(contrib[1:], contrib[0]))
    return tuple(out)


def local_backward(scales, Z, Delta, E):
    """Layer-local conjugate velocities `U_k = −s_{k+1}² Σ_ν (Δ_{k+1,μ} · E_{k+1,ν}) Z_{k,ν}`
    (the k-th source term of I5, `Q_{k+1} r` acting on `Z_k`), for k = 1..L−1."""
    return tuple(
        -(scales[k + 1] ** 2) * gram_apply(Delta[k + 1], E[k + 1], Z[k + 1])
        for k in range(len(Delta) - 1)
    )


def residual_rate(Delta, V):
    """`dr/dt = −K r = Σ_l Δ_l · V_l` (I2): each layer's term is `−K_l r`."""
    return sum(jnp.sum(apply_mask(v, d), axis=-1) for d, v in zip(Delta, V))


def rates(scales, weights, Z, D, Delta, r, *, transport: int | None = None):
    """Gradient-flow rates (η = 1) from the fields: `(dr, dH, dB, E)`.

    `dH` by (I4), `dB` by (I5) (with `dB_L = 0`), `dr = −K r` by (I2); `E_l` are the
    residual-weighted conjugate fields, so that `dW_l = −s_l E_lᵀ Z_{l-1}` (I1). Only
    `W_2..W_L` are used.
    """
    E = tuple(residual_weighted(r, d) for d in Delta)
    V = local_forward(scales, Z, E)
    dH = pushforward(scales, weights, D, V, transport=transport)
    sources = local_backward(scales, Z, Delta, E)
    dB, _ = pullback(scales, weights, D, jnp.zeros_like(Delta[-1]), sources=sources)
    return residual_rate(Delta, V), dH, dB, E


def velocities(
    net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"]
) -> Velocities:
    """Time derivatives of `r`, `H_l` and `B_l` under gradient flow with η = 1 on
    `L = ½ Σ r²`: (I2), (I4) and (I5), the operators applied matrix-free (I6).

    Cost O(P Σ N_l² + P² Σ N_l) (Gram products contracted in the cheaper order); no Gram
    operator of shape `(P, P, N, N)` is formed.

    **Arguments:** `net`; `X` of shape `(P, d)`; `y` of shape `(P,)` or `(P, k)`.

    **Returns:** `Velocities` with `r` `(P, *k)`, `H` `(P, N_l)` and `B` `(P, *k, N_l)`.
    """
    X, y = check_inputs(net, X, y)
    _, Z, D, _, Delta, f = fields(net, X)
    dr, dH, dB, _ = rates(net.scales, net.weights, Z, D, Delta, f - y)
    return Velocities(r=dr, H=dH, B=dB)
