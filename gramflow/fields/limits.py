r"""The infinite-width limit of the layer kernels (I11), by the arc-cosine recursion, for dense
layers and for the structured layers that keep a closed form.

**Dense layers.** For a bias-free ReLU network with a fixed readout, as every width goes to
infinity at initialization, the pre-activations of layer l become a Gaussian process over
inputs with covariance `Σ_l`, and the masks of two inputs overlap with probability `Ṡ_l`:

$$\Sigma_1(x,x') = \frac{x\cdot x'}{d},\qquad
\Sigma_{l+1}(x,x') = \frac{\sqrt{\Sigma_l(x,x)\Sigma_l(x',x')}}{2\pi}
  \big(\sin\theta_l + (\pi-\theta_l)\cos\theta_l\big),\qquad
\dot\Sigma_l(x,x') = \frac{\pi-\theta_l}{2\pi},$$

with `cos θ_l = Σ_l(x,x') / √(Σ_l(x,x) Σ_l(x',x'))` (Cho & Saul 2009; Jacot et al. 2018;
Arora et al. 2019). Then the normalized forward Gram `G_{l-1}/N_{l-1} → Σ_l`, the
co-activation `Q_l → Π_{m=l}^{L} Ṡ_m` and `K_l → Σ_l ⊙ Π_{m=l}^{L} Ṡ_m`, whose sum is the
usual NTK without the readout's own term (the readout is fixed). The NNGP, the covariance of
the outputs at initialization, is `Σ_{L+1}`.

**Structured layers** `W̃_l = g_l s_l (W_l ⊙ M_l) + α_l I` (`gramflow.model.layer`). Write
`Γ_l` for the limit of `G_l / N_l = E[relu(h_l) relu(h_l')]` (`Γ_0 = X Xᵀ/d`) and `Σ_l` for
the covariance of `h_l`; a dense layer has `Σ_{l+1} = Γ_l`.

- *Gains* `g_l` (fixed or trained). The weight part of `h_l` is Gaussian given layer l−1, so
  `Σ_l = g_l² Γ_{l-1}` and `Γ_l` is the arc-cosine map of `Σ_l`. ReLU is positively
  homogeneous, so the arc-cosine map commutes with scalars: with `c_l = Π_{m≤l} g_m²`,
  `Σ_l = c_l Σ_l⁰`, `Γ_l = c_l Γ_l⁰` (⁰: all gains 1), and `Ṡ_l` (an angle) is unchanged.
  Backward, `B_{l-1} = g_l s_l Δ_l (W_l ⊙ M_l)` brings one `g_l²` per layer crossed:
  `Q_l → Π_{m>l} g_m² Π_{m≥l} Ṡ_m`. The weight kernel `(g_l s_l)² G_{l-1} ⊙ Q_l → Σ_l ⊙ Q_l
  = (Π_m g_m²) K_l⁰`, as it must: `f` is proportional to `Π_m g_m`.
  A *trained* gain adds `u uᵀ`, `u_μ = s_l Δ_{l,μ}·((W_l ⊙ M_l) z_{l-1,μ})`. Without a skip,
  `(W̃_l z_{l-1})_i = h_{l,i}` and `Δ_{l,i} h_{l,i} = B_{l,i} relu(h_{l,i})`, so
  `u_μ = B_{l,μ}·z_{l,μ} / g_l = f_μ / g_l` — exactly, at every width (Euler's identity for
  the degree-one homogeneous map `z_l ↦ f`). The gain term is `f fᵀ / g_l²`: a random
  rank-one matrix that does **not** concentrate (under the normalization of the kernel, `f`
  tends to a centred Gaussian process with covariance the NNGP). Its mean tends to
  `NNGP / g_l² = Π_{m≠l} g_m² · Σ⁰_{L+1}` for `"ntk"` and `"mean_field"`, which is what is
  returned; its entries keep fluctuations of order one,
  `Var[f_μ f_ν] = NNGP_{μμ} NNGP_{νν} + NNGP_{μν}²`. For `"standard"` the weight term grows
  like the fan-in and the gain term is `O(1)`, so `K_l / N_{l-1}` loses it in the limit.
- *Masks* `M_l` whose rows all have the same fan-in `n_l` (the library's scales and
  `"standard"` init use the mask's mean fan-in, here `n_l`): unit i of a hidden layer l ≥ 2
  reads `n_l` units of layer l−1, which are exchangeable, so
  `s_l² Σ_{j∈row i} z_j z_j' → Γ_{l-1}` for every row as `n_l → ∞`: the dense recursion with
  `n_l` in place of `N_{l-1}`. Backward, `Σ_j D_j D_j' B_j B_j'` sums `Δ_i Δ_i'` over the
  `nnz(M_l) = N_l n_l` connections with the factor `s_l² = 1/n_l`: unchanged. The weight
  kernel `(g s)² Σ_i Δ_i Δ_i' Σ_{j∈row i} z_j z_j' → g_l² Γ_{l-1} ⊙ Q_l`. What converges is
  `K_l` for `"ntk"` and `K_l / n_l` (not `/ N_{l-1}`) for `"standard"`. The limit needs each
  row's fan-in to grow with the width (a fixed number of blocks, a band whose width is a fixed
  fraction of the layer); a band of fixed width has no Gaussian limit. On the *first* layer
  the inputs are fixed, so nothing averages: the mask is accepted when all its rows are equal
  (it drops input coordinates, `Σ_1 = X_S X_Sᵀ / n_1` over the kept coordinates S).

**Refused**, each with a `ValueError` naming the argument: skip paths (see `_check_limit`:
`h_l = ξ + α relu(h_{l-1})` is not Gaussian, and the mask overlaps and the next Gram are
integrals of a four-dimensional Gaussian cut by two rectifications, with no closed form);
hidden masks with unequal row fan-ins; first-layer masks with unequal rows.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
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


def _fan_ins(net: ReLUNet) -> tuple[int, ...]:
    """Per layer, the fan-in `n_l` the limit uses: the mask's (equal) row fan-in, else
    `N_{l-1}`."""
    dense = (net.in_dim, *net.widths[:-1])
    masks = net.masks or (None,) * net.depth
    return tuple(n if m is None else int(m.array[0].sum()) for m, n in zip(masks, dense))


def _trained_gains(net: ReLUNet) -> bool:
    return net.gains is not None and "gains" in net.train


def limit_normalization(net: ReLUNet) -> dict[str, Array]:
    """The factors that make a finite network's kernels converge to `limit_kernels`, for its
    parametrization (widths from `net`):

    | parametrization | `K_l` | `Q_l` | NNGP (`E f fᵀ`) |
    | --- | --- | --- | --- |
    | `"ntk"` | 1 | 1 | 1 |
    | `"standard"` | `1/n_l` | 1 | 1 |
    | `"mean_field"` | `N_L` | `N_L` | `N_L` |

    with `n_l` the fan-in of layer l: `N_{l-1}` (`N_0 = d`) for a dense layer, the row fan-in
    of its mask for a masked one. Each is times `γ₀²` for a network built with `gamma0=γ₀`
    (its output carries `1/γ₀`). The forward Gram always converges as `G_l/N_l`. So
    `c["K"][l] * layer_kernels(net, X).K[l] → limit_kernels(net, X).K[l]`, with fluctuations
    of order `N^{-1/2}` — except the term of a trained gain, whose fluctuations stay of order
    one (see `limit_kernels`): its *mean* converges.

    **Returns:** a dict with arrays `"G"`, `"Q"`, `"K"` of shape `(L,)` and a scalar `"nngp"`.
    Refuses the structures `limit_kernels` refuses.
    """
    check_net(net)
    _check_limit(net)
    units = jnp.asarray((net.in_dim, *net.widths[:-1]), net.dtype)
    fan_in = jnp.asarray(_fan_ins(net), net.dtype)
    ones = jnp.ones((net.depth,), net.dtype)
    n_last = jnp.asarray(net.widths[-1], net.dtype)
    if net.parametrization == "ntk":
        K, Q, nngp = ones, ones, jnp.ones((), net.dtype)
    elif net.parametrization == "standard":
        K, Q, nngp = 1.0 / fan_in, ones, jnp.ones((), net.dtype)
    else:  # mean_field
        K, Q, nngp = n_last * ones, n_last * ones, n_last
    g2 = gamma0(net) ** 2  # the output carries 1/γ₀: kernels and the NNGP carry 1/γ₀²
    return {"G": 1.0 / units, "Q": g2 * Q, "K": g2 * K, "nngp": g2 * nngp}


def _check_limit(net: ReLUNet) -> None:
    """Refuse, with the reason, what has no closed-form limit."""
    if net.parametrization not in ("ntk", "standard", "mean_field"):
        raise ValueError(
            f"`net` has parametrization {net.parametrization!r}: the width scaling of the "
            "limit depends on it. Build the network with `ReLUNet.init(..., "
            "parametrization='ntk' | 'standard' | 'mean_field')`.")
    if net.skips is not None:
        layers = [l + 1 for l, a in enumerate(net.skips) if a is not None]
        trained = "skips" in net.train
        raise ValueError(
            f"`net.skips`: layer(s) {layers} have a skip path "
            f"({'trained' if trained else 'fixed'} α), and skip paths have no closed-form "
            "limit. In gramflow the skip adds the previous layer's *activation*, "
            "h_l = g s (W ⊙ M) z_(l-1) + α z_(l-1) with z_(l-1) = relu(h_(l-1)), so h_l is a "
            "Gaussian plus a rectified Gaussian, not Gaussian: its covariance is still "
            "closed, (g_l² + α_l²) Γ_(l-1), but the mask overlap P(h_l > 0, h_l' > 0) and the "
            "next Gram E[relu(h_l) relu(h_l')] are integrals of a four-dimensional Gaussian "
            "cut by relu(h_(l-1)), with no arc-cosine formula"
            + ("; a trained α adds, besides, a random rank-one term" if trained else "")
            + ". Use a network without skip paths.")
    if net.masks is None:
        return
    for l, m in enumerate(net.masks):
        if m is None:
            continue
        a = m.array
        rows = a.sum(axis=1)
        if l == 0 and not np.all(a == a[:1]):
            raise ValueError(
                f"`net.masks[0]`: the first-layer mask gives units different sets of input "
                f"coordinates (fan-ins {int(rows.min())}..{int(rows.max())}). The input "
                "dimension stays fixed as the widths grow, so nothing averages: each unit's "
                "pre-activation has its own covariance X_S X_Sᵀ / n over its coordinates S, the "
                "units of layer 1 are no longer exchangeable, and the limit is not one "
                "arc-cosine recursion. Only a first-layer mask whose rows are all equal (it "
                "drops input coordinates) has this closed form.")
        if l > 0 and rows.min() != rows.max():
            raise ValueError(
                f"`net.masks[{l}]`: its rows have unequal fan-in ({int(rows.min())} to "
                f"{int(rows.max())} inputs per unit; `Mask.banded` cuts its band at the edges, "
                "`Mask.random` draws each row). A unit with fan-in n_i has variance n_i / n̄ "
                "times the dense one and the weight kernel weighs its co-activation by n_i, so "
                "the limit depends on how the fan-ins line up with the masks around the layer, "
                "not on the arc-cosine recursion alone. Masks whose rows all have the same "
                "fan-in (`Mask.block_diagonal` with equal blocks, a circulant band) have the "
                "dense limit with that fan-in.")


def limit_kernels(
    net: ReLUNet, X: Float[Array, "P d"], X2: Float[Array, "Q d"] | None = None
) -> LayerKernels:
    """The infinite-width limit of `layer_kernels(net, X, X2)` (I11), layer by layer.

    The network gives the depth, the parametrization, the output dimension and its structure
    (gains, masks); its widths and weights are ignored. The limits are of the normalized
    finite quantities (see `limit_normalization`): for the `"ntk"` parametrization of the
    kernels themselves, for `"standard"` of `K_l / n_l` (`n_l` the layer's fan-in), for
    `"mean_field"` of `N_L K_l`.

    **Structure** (derivation in the module docstring and `docs/math/limits.md`):

    - gains `g_l` (fixed or trained): `Σ_l = g_l² Γ_{l-1}`, `Q_l → Π_{m>l} g_m² Π_{m≥l} Ṡ_m`;
      a *trained* gain adds the mean of its rank-one term, `NNGP / g_l²` (`"ntk"`,
      `"mean_field"`; it vanishes under the `"standard"` normalization). That term equals
      `f fᵀ / g_l²` at every width and does not concentrate: the finite `K_l` converges in
      mean, with fluctuations of order one — this is the kernel's expectation, not the
      almost-sure limit, and lazy dynamics of the finite network follow its own random `K_0`.
    - masks whose rows all have the same fan-in `n_l` (first layer: all rows equal): the
      dense limit with `n_l` in place of `N_{l-1}`; the fan-ins must grow with the widths.
    - refused with a `ValueError` naming the argument and the reason: skip paths (fixed or
      trained), hidden masks with unequal row fan-ins, first-layer masks with unequal rows.

    **Arguments:** `net`: a `ReLUNet` with parametrization `"ntk"`, `"standard"` or
    `"mean_field"`; `X` `(P, d)`; `X2`: `None` or `(Q, d)` for the cross blocks.

    **Returns:** a `LayerKernels` with `G[l] = Γ_l`, the limit of `G_l / N_l` (`G[0] =
    X X2ᵀ / d`; for a dense net `Γ_l = Σ_{l+1}`), `Q[l]` and `K[l]` as above (`K[l] = Σ_{l+1}
    ⊙ Q[l]` plus the gain term), `total = Σ_l K[l]` (the NTK of the hidden layers), and
    `nngp = Σ_{L+1}` (the covariance of the outputs at initialization). Kernels are `(P, Q)`,
    or `(P, Q, k, k)` for `k` outputs (times the identity in the output indices: distinct
    outputs are independent in the limit).
    """
    check_net(net)
    _check_limit(net)
    X, _ = check_data(X, net=net)
    X2 = X if X2 is None else check_data(X2, net=net)[0]
    L, d = net.depth, X.shape[1]
    # Σ_1 over the coordinates the first layer reads (all of them unless its mask drops some).
    first = None if net.masks is None else net.masks[0]
    S1, S2 = (X, X2) if first is None else (X[:, first.array[0]], X2[:, first.array[0]])
    n1 = S1.shape[1]
    var1, var2 = jnp.sum(S1 * S1, axis=1) / n1, jnp.sum(S2 * S2, axis=1) / n1
    cross = S1 @ S2.T / n1
    # The recursion with unit gains (⁰): Σ⁰_l, Γ⁰_l = arccos map of Σ⁰_l, Ṡ_l.
    sigma0, gamma0_, dots = [], [], []
    for _ in range(L):
        sigma0.append(cross)
        var1, var2, cross, dot = _arccos_step(var1, var2, cross)
        gamma0_.append(cross)
        dots.append(dot)
    nngp0 = cross
    # Gains: c_l = Π_{m≤l} g_m² (forward), t_l = Π_{m>l} g_m² (backward), both (L,).
    g2 = (jnp.ones((L,), X.dtype) if net.gains is None
          else jnp.asarray(net.gains, X.dtype) ** 2)
    c = jnp.cumprod(g2)
    t = jnp.concatenate([jnp.cumprod(g2[::-1])[::-1][1:], jnp.ones((1,), X.dtype)])
    before = jnp.concatenate([jnp.ones((1,), X.dtype), c[:-1]])  # Π_{m<l} g_m²
    G = [X @ X2.T / d] + [c[l - 1] * gamma0_[l - 1] for l in range(1, L)]
    Q, acc = [], jnp.ones_like(nngp0)
    for dot in reversed(dots):
        acc = acc * dot
        Q.append(acc)
    Q = [t[l] * q for l, q in enumerate(Q[::-1])]
    K = [c[l] * s * q for l, (s, q) in enumerate(zip(sigma0, Q))]
    if _trained_gains(net) and net.parametrization != "standard":
        # E[u uᵀ] with u = f / g_l: NNGP / g_l² = Π_{m≠l} g_m² · Σ⁰_{L+1}.
        K = [k + before[l] * t[l] * nngp0 for l, k in enumerate(K)]
    nngp = c[-1] * nngp0
    if net.out_dim is not None:
        eye = jnp.eye(net.out_dim, dtype=X.dtype)[None, None]
        Q, K, nngp = ([q[..., None, None] * eye for q in Q], [k[..., None, None] * eye for k in K],
                      nngp[..., None, None] * eye)
    return LayerKernels(G=tuple(G), Q=tuple(Q), K=tuple(K), total=sum(K[1:], K[0]), nngp=nngp)
