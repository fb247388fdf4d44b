r"""The infinite-width limit of the layer kernels (I11), by the arc-cosine recursion.

For a bias-free ReLU network with a fixed readout, as every width goes to infinity at
initialization, the pre-activations of layer l become a Gaussian process over inputs with
covariance `Σ_l`, and the masks of two inputs overlap with probability `Ṡ_l`:

$$\Sigma_1(x,x') = \frac{x\cdot x'}{d},\qquad
\Sigma_{l+1}(x,x') = \frac{\sqrt{\Sigma_l(x,x)\Sigma_l(x',x')}}{2\pi}
  \big(\sin\theta_l + (\pi-\theta_l)\cos\theta_l\big),\qquad
\dot\Sigma_l(x,x') = \frac{\pi-\theta_l}{2\pi},$$

with `cos θ_l = Σ_l(x,x') / √(Σ_l(x,x) Σ_l(x',x'))` (Cho & Saul 2009; Jacot et al. 2018;
Arora et al. 2019). Then the normalized forward Gram `G_{l-1}/N_{l-1} → Σ_l`, the
co-activation `Q_l → Π_{m=l}^{L} Ṡ_m` and `K_l → Σ_l ⊙ Π_{m=l}^{L} Ṡ_m`, whose sum is the
usual NTK without the readout's own term (the readout is fixed). The NNGP, the covariance of
the outputs at initialization, is `Σ_{L+1}`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._checks import check_data
from ..model.network import ReLUNet, check_net, gamma0
from .kernels import LayerKernels


def _arccos_step(var1, var2, cov):
    """One layer of the recursion: `(Σ_{l+1}(x,x), Σ_{l+1}(x',x'), Σ_{l+1}(x,x'), Ṡ_l(x,x'))`
    from `Σ_l`'s diagonals `(P,)`, `(Q,)` and cross block `(P, Q)`."""
    norm = jnp.sqrt(var1[:, None] * var2[None, :])
    tiny = jnp.finfo(cov.dtype).tiny
    cos = jnp.clip(cov / jnp.maximum(norm, tiny), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sqrt(jnp.maximum(1.0 - cos**2, 0.0))
    cross = norm * (sin + (math.pi - theta) * cos) / (2 * math.pi)
    dot = (math.pi - theta) / (2 * math.pi)
    return var1 / 2, var2 / 2, cross, dot


def limit_normalization(net: ReLUNet) -> dict[str, Float[Array, "..."]]:
    """The factors that make a finite network's kernels converge to `limit_kernels`, for its
    parametrization (widths from `net`):

    | parametrization | `K_l` | `Q_l` | NNGP (`E f fᵀ`) |
    | --- | --- | --- | --- |
    | `"ntk"` | 1 | 1 | 1 |
    | `"standard"` | `1/N_{l-1}` | 1 | 1 |
    | `"mean_field"` | `N_L` | `N_L` | `N_L` |

    (`N_0 = d`), each times `γ₀²` for a network built with `gamma0=γ₀` (its output carries
    `1/γ₀`). The forward Gram always converges as `G_{l-1}/N_{l-1}`. So
    `c["K"][l] * layer_kernels(net, X).K[l] → limit_kernels(net, X).K[l]`, with fluctuations
    of order `N^{-1/2}`.

    **Returns:** a dict with arrays `"G"`, `"Q"`, `"K"` of shape `(L,)` and a scalar `"nngp"`.
    """
    check_net(net)
    _check_limit(net)
    fan_in = jnp.asarray((net.in_dim, *net.widths[:-1]), net.dtype)
    ones = jnp.ones((net.depth,), net.dtype)
    n_last = jnp.asarray(net.widths[-1], net.dtype)
    if net.parametrization == "ntk":
        K, Q, nngp = ones, ones, jnp.ones((), net.dtype)
    elif net.parametrization == "standard":
        K, Q, nngp = 1.0 / fan_in, ones, jnp.ones((), net.dtype)
    else:  # mean_field
        K, Q, nngp = n_last * ones, n_last * ones, n_last
    g2 = gamma0(net) ** 2  # the output carries 1/γ₀: kernels and the NNGP carry 1/γ₀²
    return {"G": 1.0 / fan_in, "Q": g2 * Q, "K": g2 * K, "nngp": g2 * nngp}


def _check_limit(net: ReLUNet) -> None:
    if net.parametrization not in ("ntk", "standard", "mean_field"):
        raise ValueError(
            f"`net` has parametrization {net.parametrization!r}: the width scaling of the "
            "limit depends on it. Build the network with `ReLUNet.init(..., "
            "parametrization='ntk' | 'standard' | 'mean_field')`.")
    if net.masks is not None or net.gains is not None or net.skips is not None:
        raise ValueError(
            "`limit_kernels` covers dense layers only: masks, gains and skip paths change the "
            "limit (a skip path adds a unit-dependent mean to the pre-activations, a trained "
            "gain a random rank-one term) and are not implemented; use a dense network of the "
            "same depth and parametrization.")


def limit_kernels(
    net: ReLUNet, X: Float[Array, "P d"], X2: Float[Array, "Q d"] | None = None
) -> LayerKernels:
    """The infinite-width limit of `layer_kernels(net, X, X2)` (I11), layer by layer.

    The network gives the depth, the parametrization and the output dimension; its widths
    and weights are ignored. The limits are of the normalized finite quantities (see
    `limit_normalization`): for the `"ntk"` parametrization of the kernels themselves, for
    `"standard"` of `K_l / N_{l-1}`, for `"mean_field"` of `N_L K_l`.

    **Arguments:** `net`: a dense `ReLUNet` with parametrization `"ntk"`, `"standard"` or
    `"mean_field"` (structures are refused); `X` `(P, d)`; `X2`: `None` or `(Q, d)` for the
    cross blocks.

    **Returns:** a `LayerKernels` with `G[l] = Σ_{l+1}` (the limit of `G_l / N_l`, `G[0] =
    X X2ᵀ / d`), `Q[l] = Π_{m≥l} Ṡ_m`, `K[l] = G[l] ⊙ Q[l]`, `total = Σ_l K[l]` (the NTK of
    the hidden layers), and `nngp = Σ_{L+1}` (the covariance of the outputs at
    initialization). Kernels are `(P, Q)`, or `(P, Q, k, k)` for `k` outputs (times the
    identity in the output indices: distinct outputs are independent in the limit).
    """
    check_net(net)
    _check_limit(net)
    X, _ = check_data(X, net=net)
    X2 = X if X2 is None else check_data(X2, net=net)[0]
    d = X.shape[1]
    var1, var2 = jnp.sum(X * X, axis=1) / d, jnp.sum(X2 * X2, axis=1) / d
    cross = X @ X2.T / d
    sigmas, dots = [], []
    for _ in range(net.depth):
        sigmas.append(cross)
        var1, var2, cross, dot = _arccos_step(var1, var2, cross)
        dots.append(dot)
    Q, acc = [], jnp.ones_like(cross)
    for dot in reversed(dots):
        acc = acc * dot
        Q.append(acc)
    Q = Q[::-1]
    K = [s * q for s, q in zip(sigmas, Q)]
    nngp = cross
    if net.out_dim is not None:
        eye = jnp.eye(net.out_dim, dtype=X.dtype)[None, None]
        Q, K, nngp = ([q[..., None, None] * eye for q in Q], [k[..., None, None] * eye for k in K],
                      nngp[..., None, None] * eye)
    return LayerKernels(G=tuple(sigmas), Q=tuple(Q), K=tuple(K), total=sum(K[1:], K[0]),
                        nngp=nngp)
