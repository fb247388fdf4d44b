"""The structure study: plain, pathway-masked and corrected networks compared against depth."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._mask import Mask
from .._progress import progress_bar
from ..dynamics.simulate import simulate
from ..model.network import ReLUNet, structure_kwargs
from .robustness import kernel_spectrum, robustness
from .spectral import eigenvalue_sensitivity, sharpness


def pathway_structure(blocks: int = 4) -> Callable[[int, tuple[int, ...]], dict]:
    """Constrained pathways: block-diagonal masks with `blocks` pathways on every
    hidden-to-hidden layer (the input layer stays dense, so every pathway sees all inputs)."""

    def build(d, widths):
        fan_in = (d, *widths[:-1])
        return dict(masks=[None] + [Mask.block_diagonal((n, m), blocks)
                                    for n, m in zip(widths[1:], fan_in[1:])])

    return build


def corrected_structure(alpha: float = 0.5) -> Callable[[int, tuple[int, ...]], dict]:
    """Adaptive corrections: a skip path `α z` on every layer with equal in and out widths
    (trained `α_l`) and a trained gain `g_l` on every layer."""

    def build(d, widths):
        fan_in = (d, *widths)
        skips = [alpha if n == m else None for n, m in zip(widths, fan_in)]
        if not any(s is not None for s in skips):
            return dict(gains=1.0)
        return dict(gains=1.0, skips=skips, train=("weights", "gains", "skips"))

    return build


def default_structures() -> dict[str, Callable | None]:
    """`plain`, `pathways` (4 block-diagonal pathways), `corrected` (skip α = 0.5 + gains),
    and `both`."""
    pw, cr = pathway_structure(4), corrected_structure(0.5)
    return {"plain": None, "pathways": pw, "corrected": cr,
            "both": lambda d, w: {**pw(d, w), **cr(d, w)}}


METRICS = {
    "lr": "step size η = lr_scale / mean λ_max(K₀) over seeds",
    "kernel_max": "λ_max(K₀)",
    "condition": "λ_max / λ_min of K₀",
    "steps_to_target": "first step with L ≤ target · L₀ (NaN: never)",
    "final_ratio": "L_T / L₀",
    "nonmonotone": "fraction of steps on which the loss went up",
    "roughness": "mean |Δ² log L| / mean |Δ log L| (0 for a geometric decay)",
    "sharpness_init": "λ_max of the loss Hessian at t = 0",
    "sharpness_final": "λ_max of the loss Hessian at the end",
    "eta_sharpness": "η · final sharpness (GD is stable below 2)",
    "sensitivity_weights": "‖W ⊙ ∂λ_max(K)/∂W‖ / λ_max: log-derivative w.r.t. the weights",
    "sensitivity_inputs": "‖X ⊙ ∂λ_max(K)/∂X‖ / λ_max: log-derivative w.r.t. the inputs",
    "robust_input_loss": "|ΔL|/L for input perturbations of relative size eps",
    "robust_weight_kernel": "‖ΔK‖/‖K‖ for weight perturbations of relative size eps",
}


class StructureStudy(eqx.Module):
    """Results of `structure_study`.

    **Fields:** `names`, `depths` (static); `metrics`: dict of `METRICS` names to arrays
    `(len(names), len(depths), len(seeds))`; `loss`: `(len(names), len(depths), len(seeds),
    steps + 1)` loss curves.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    depths: tuple[int, ...] = eqx.field(static=True)
    metrics: dict[str, Array]
    loss: Float[Array, "S D R T"]

    def table(self, metrics: Sequence[str] | None = None) -> str:
        """Means over seeds, one row per (structure, depth)."""
        metrics = list(METRICS) if metrics is None else list(metrics)
        head = ["structure", "L"] + metrics
        rows = []
        for i, name in enumerate(self.names):
            for j, L in enumerate(self.depths):
                vals = [np.nanmean(np.asarray(self.metrics[m][i, j])) for m in metrics]
                rows.append([name, str(L)] + [f"{v:.3g}" for v in vals])
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        return "\n".join([fmt.format(*head), *(fmt.format(*r) for r in rows)])


def _curve_metrics(loss: np.ndarray, target: float):
    """Steps to target, final ratio, fraction of increases and roughness of a loss curve."""
    loss = np.asarray(loss, np.float64)
    ratio = loss / loss[0]
    hit = np.flatnonzero(ratio <= target)
    log = np.log(np.maximum(loss, np.finfo(np.float64).tiny))
    d1, d2 = np.diff(log), np.diff(log, 2)
    rough = np.mean(np.abs(d2)) / max(np.mean(np.abs(d1)), 1e-300) if d2.size else 0.0
    return (float(hit[0]) if hit.size else np.nan, ratio[-1], float(np.mean(d1 > 0)), rough)


def structure_study(
    X: Float[Array, "P d"],
    y: Float[Array, " P"],
    *,
    depths: Sequence[int] = (1, 2, 3, 5, 7),
    width: int = 32,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    lr_scale: float = 1.0,
    target: float = 1e-2,
    eps: float = 0.05,
    structures: dict[str, Callable | dict | None] | None = None,
    parametrization: str = "ntk",
    progress: bool = True,
) -> StructureStudy:
    """Compare structures against depth on one dataset: convergence speed, loss-curve
    smoothness, sharpness, spectral sensitivity, robustness and kernel conditioning.

    For each structure (default `default_structures()`: plain, pathway-masked, corrected,
    both) and each depth L (hidden layers; depth L + 1 counting the readout) this builds one
    network of `width` units per hidden layer per seed, runs gradient descent for `steps`
    steps with `η = lr_scale / λ_max(K₀)` (mean over seeds, as in `depth_scaling`: each
    network family at the same margin from the lazy stability limit), and measures the
    `METRICS` at initialization and after training, with `kernel_spectrum`, `sharpness`,
    `eigenvalue_sensitivity` and `robustness`.

    **Returns:** a `StructureStudy`; `print(study.table())` gives the means over seeds.
    """
    structures = default_structures() if structures is None else dict(structures)
    X, y = jnp.asarray(X), jnp.asarray(y)
    d = X.shape[1]
    names, depths, seeds = tuple(structures), tuple(int(L) for L in depths), tuple(seeds)
    out = {m: np.full((len(names), len(depths), len(seeds)), np.nan) for m in METRICS}
    curves = np.zeros((len(names), len(depths), len(seeds), steps + 1))
    bar = progress_bar(len(names) * len(depths), progress, desc="structure study", unit="depth")
    for i, name in enumerate(names):
        structure = structures[name]
        for j, L in enumerate(depths):
            arch = (width,) * L
            kw = structure_kwargs(structure, d, arch)
            nets = [ReLUNet.init(jax.random.key(seed), d, arch, parametrization=parametrization,
                                 dtype=X.dtype, **kw) for seed in seeds]
            spectra = [kernel_spectrum(net, X)[0] for net in nets]
            lr = lr_scale / float(np.mean([ev[0] for ev in spectra]))
            for s, net in enumerate(nets):
                traj = simulate(net, X, y, steps=steps, lr=lr, observables=("loss",))
                curve = np.asarray(traj.loss)
                curves[i, j, s] = curve
                hit, ratio, up, rough = _curve_metrics(curve, target)
                final = traj.final
                sens = eigenvalue_sensitivity(net, X, m=1)
                lam = sens.values[0, 0]
                sw = jnp.sqrt(sum(jnp.sum((w * g[0, 0]) ** 2) for w, g in zip(net.weights, sens.weights)))
                sx = jnp.linalg.norm(X * sens.inputs[0, 0])
                rob = robustness(net, X, y, eps=eps, n=4)
                sharp0 = sharpness(net, X, y).values[0]
                sharp1 = sharpness(final, X, y).values[0]
                row = dict(lr=lr, kernel_max=spectra[s][0],
                           condition=spectra[s][0] / spectra[s][-1], steps_to_target=hit,
                           final_ratio=ratio, nonmonotone=up, roughness=rough,
                           sharpness_init=sharp0, sharpness_final=sharp1,
                           eta_sharpness=lr * sharp1, sensitivity_weights=sw / lam,
                           sensitivity_inputs=sx / lam,
                           robust_input_loss=jnp.mean(rob.input_loss),
                           robust_weight_kernel=jnp.mean(rob.weight_kernel))
                for m, v in row.items():
                    out[m][i, j, s] = float(v)
            bar.update(1)
    bar.close()
    return StructureStudy(names=names, depths=depths,
                          metrics={m: jnp.asarray(v) for m, v in out.items()},
                          loss=jnp.asarray(curves))
