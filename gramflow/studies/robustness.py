"""Robustness to perturbations, and how the kernel and training scale with depth."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._algebra import flat_kernel
from ..dynamics.sweep import sweep
from ..fields.kernels import collective_kernel, layer_kernels
from ..model.network import ReLUNet, _positive_int, check_inputs, forward, structure_kwargs


class Robustness(eqx.Module):
    """Relative response of the loss, the output and the kernel to random perturbations of
    the inputs and of the weights, each of relative size `eps`. Arrays have one entry per
    random direction, `(n,)`.

    **Fields:** `eps`; `loss` (unperturbed); `input_loss`, `weight_loss`: `|ΔL| / L`;
    `input_output`, `weight_output`: `‖Δf‖ / ‖f‖`; `input_kernel`, `weight_kernel`:
    `‖ΔK‖_F / ‖K‖_F`.
    """

    eps: Float[Array, ""]
    loss: Float[Array, ""]
    input_loss: Float[Array, " n"]
    input_output: Float[Array, " n"]
    input_kernel: Float[Array, " n"]
    weight_loss: Float[Array, " n"]
    weight_output: Float[Array, " n"]
    weight_kernel: Float[Array, " n"]

    def summary(self) -> dict[str, float]:
        """Mean of each response over the directions, as Python floats."""
        names = ["input_loss", "input_output", "input_kernel", "weight_loss", "weight_output",
                 "weight_kernel"]
        return {n: float(jnp.mean(getattr(self, n))) for n in names}


def robustness(net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"], *,
               eps: float = 1e-2, n: int = 8, key: PRNGKeyArray | None = None) -> Robustness:
    """Response of loss, output `f` and collective kernel `K` (I2) to `n` random perturbations
    of relative size `eps`: of the inputs (each sample moved by `eps ‖x_μ‖` in a random
    direction) and of the weights (each `W_l` moved by `eps ‖W_l ⊙ M_l‖_F` within its mask,
    so the structure is kept).

    **Arguments:** `net`; `X` `(P, d)`; `y`; `eps` > 0; `n` directions; `key` (default
    `jax.random.key(0)`).

    **Returns:** `Robustness`.
    """
    X, y = check_inputs(net, X, y)
    if not np.isfinite(eps) or eps <= 0:
        raise ValueError(f"`eps` must be positive and finite, got {eps!r}.")
    n = _positive_int("n", n)
    key = jax.random.key(0) if key is None else key
    return _robustness(net, X, y, eps, n, key)


@eqx.filter_jit
def _robustness(net, X, y, eps, n, key):
    def measure(net_, X_):
        f = forward(net_, X_)[-1]
        return 0.5 * jnp.sum((f - y) ** 2), f, flat_kernel(collective_kernel(net_, X_))

    L0, f0, K0 = measure(net, X)
    rel = lambda a, b: jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())  # noqa: E731

    def unit(k, shape, axis=None):
        u = jax.random.normal(k, shape, X.dtype)
        return u / jnp.linalg.norm(u, axis=axis, keepdims=axis is not None)

    def one(k):
        kx, kw = jax.random.split(k)
        dX = eps * jnp.linalg.norm(X, axis=1, keepdims=True) * unit(kx, X.shape, axis=1)
        Li, fi, Ki = measure(net, X + dX)
        keys = jax.random.split(kw, net.depth)
        moved = []
        for l, (kl, W) in enumerate(zip(keys, net.weights)):
            d = net.layers[l].masked(unit(kl, W.shape))
            d = d / jnp.linalg.norm(d)
            moved.append(W + eps * jnp.linalg.norm(net.layers[l].masked()) * d)
        Lw, fw, Kw = measure(eqx.tree_at(lambda m: m.weights, net, tuple(moved)), X)
        return (jnp.abs(Li - L0) / L0, rel(fi, f0), rel(Ki, K0),
                jnp.abs(Lw - L0) / L0, rel(fw, f0), rel(Kw, K0))

    out = jax.vmap(one)(jax.random.split(key, n))
    return Robustness(jnp.asarray(eps, X.dtype), L0, *out)


@eqx.filter_jit
def kernel_spectrum(net: ReLUNet, X: Float[Array, "P d"]):
    """Eigenvalues of `K` (descending) and the layer shares `tr K_l / tr K` (I2)."""
    lk = layer_kernels(net, X)
    tr = jnp.stack([jnp.trace(flat_kernel(K)) for K in lk.K])
    return jnp.linalg.eigvalsh(flat_kernel(lk.total))[::-1], tr / jnp.sum(tr)


class DepthScaling(eqx.Module):
    """Kernel spectrum, trainability and convergence speed against depth.

    **Fields** (leading axes `(len(depths), len(seeds))`):

    - `depths` (static): numbers of hidden layers L (depth in weight layers is L + 1).
    - `kernel_top`: `(D, S, m)` top eigenvalues of K at initialization.
    - `condition_number`: `(D, S)`, `λ_max / λ_min` of K at initialization.
    - `kernel_share`: `(D, S, L_max)`, `tr K_l / tr K` (NaN beyond a network's depth).
    - `lrs`: `(D,)` the step sizes used, `lr_scale / mean λ_max(K)` per depth.
    - `loss`: `(D, S, steps + 1)` loss curves.
    - `steps_to_target`: `(D, S)` first step with `loss ≤ target · loss_0`, −1 if never.
    - `trainable`: `(D, S)` whether that target was reached with a finite loss.
    """

    depths: tuple[int, ...] = eqx.field(static=True)
    kernel_top: Float[Array, "D S m"]
    condition_number: Float[Array, "D S"]
    kernel_share: Float[Array, "D S Lmax"]
    lrs: Float[Array, " D"]
    loss: Float[Array, "D S T"]
    steps_to_target: Array
    trainable: Array


def depth_scaling(
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    depths: Sequence[int],
    width: int,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    lr_scale: float = 1.0,
    target: float = 1e-2,
    top_m: int = 5,
    parametrization: str = "ntk",
    structure: dict | Callable | None = None,
    progress: bool = True,
) -> DepthScaling:
    """How depth changes the collective kernel and training: for each depth, networks of
    `width` units per hidden layer (one per seed, with the given `structure` as in `sweep`),
    their kernel spectrum and layer shares at initialization (I2), and gradient descent with
    `η = lr_scale / λ_max(K₀)` (the kernel's own stability scale, so depths are compared at
    equal footing; `lr_scale < 2` keeps the lazy dynamics stable), run through `sweep`.

    **Returns:** `DepthScaling`.
    """
    X, depths, seeds = jnp.asarray(X), tuple(int(L) for L in depths), tuple(seeds)
    if not depths or min(depths) <= 0:
        raise ValueError(f"`depths` must be positive ints, got {depths!r}.")
    d = X.shape[1]
    L_max = max(depths)
    tops, conds, shares, lrs, losses = [], [], [], [], []
    for L in depths:
        arch = (width,) * L
        kw = structure_kwargs(structure, d, arch)
        spectra, share = [], []
        for s in seeds:
            net = ReLUNet.init(jax.random.key(s), d, arch, parametrization=parametrization,
                               dtype=X.dtype, **kw)
            ev, sh = kernel_spectrum(net, X)
            spectra.append(ev)
            share.append(jnp.pad(sh, (0, L_max - L), constant_values=jnp.nan))
        spectra = jnp.stack(spectra)
        tops.append(spectra[:, :top_m])
        conds.append(spectra[:, 0] / spectra[:, -1])
        shares.append(jnp.stack(share))
        lr = lr_scale / float(jnp.mean(spectra[:, 0]))
        lrs.append(lr)
        res = sweep(X, y, widths=(width,), depths=(L,), seeds=seeds, lrs=(lr,), steps=steps,
                    parametrization=parametrization, observables=("loss",),
                    structure=structure, progress=progress)
        losses.append(res.loss[0, 0, :, 0])  # (S, T)
    loss = jnp.stack(losses)
    reached = loss <= target * loss[..., :1]
    steps_to = jnp.where(jnp.any(reached, -1), jnp.argmax(reached, -1), -1)
    finite = jnp.all(jnp.isfinite(loss), -1)
    return DepthScaling(depths=depths, kernel_top=jnp.stack(tops), condition_number=jnp.stack(conds),
                        kernel_share=jnp.stack(shares), lrs=jnp.asarray(lrs), loss=loss,
                        steps_to_target=steps_to, trainable=(steps_to >= 0) & finite)
