"""Finite against infinite width, measured: distance of the layer kernels from their limit,
kernel drift, and the test loss of trained networks against lazy predictions."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._checks import check_data
from .._progress import progress_bar
from ..dynamics.lazy import lazy_predictions
from ..dynamics.simulate import simulate
from ..fields.kernels import layer_kernels
from ..fields.limits import limit_kernels, limit_normalization
from ..model.network import ReLUNet, natural_lr

#: what the literature leads one to expect of each measured quantity against width N
#: (Lee et al. 2019; Dyer & Gur-Ari 2020): fluctuations of K₀ ~ N^{-1/2}, kernel drift over
#: training ~ N^{-1/2} under the NTK scaling, and the gap to the lazy prediction ~ N^{-1/2}.
KNOWN_SLOPES = {"kernel_distance": -0.5, "kernel_drift": -0.5, "lazy_gap": -0.5}


class LimitStudy(eqx.Module):
    """Measurements over settings × widths × seeds (`settings` are `(parametrization, γ₀)`).

    **Fields:**

    - `kernel_distance` `(S, W, seeds, L + 1)`: `‖c_l K_l(0) − Θ_l‖ / ‖Θ_l‖` per layer (with
      the normalization `c_l` of `limit_normalization`), and for the sum of the layers last.
    - `kernel_drift` `(S, W, seeds)`: `‖K(T) − K(0)‖ / ‖K(0)‖` after training.
    - `test_loss` `(S, W, seeds)`: test loss `½ Σ (f − y)²` of the trained network.
    - `lazy_own` / `lazy_limit` `(S, W, seeds)`: test loss of the lazy prediction after the
      same number of steps with the network's own `K₀`, resp. with the limit `Θ` (both from
      the network's own initial outputs).
    - `train_loss` `(S, W, seeds)`: final training loss.
    """

    kernel_distance: Float[Array, "S W seeds L1"]
    kernel_drift: Float[Array, "S W seeds"]
    test_loss: Float[Array, "S W seeds"]
    lazy_own: Float[Array, "S W seeds"]
    lazy_limit: Float[Array, "S W seeds"]
    train_loss: Float[Array, "S W seeds"]
    settings: tuple = eqx.field(static=True)
    widths: tuple[int, ...] = eqx.field(static=True)
    seeds: tuple[int, ...] = eqx.field(static=True)

    def slopes(self) -> dict[str, np.ndarray]:
        """Log-log slopes against width of the seed means, per setting: `kernel_distance`
        `(S, L + 1)`, `kernel_drift` `(S,)`, and `lazy_gap` `(S,)` — the relative gap
        `|test_loss − lazy_limit| / lazy_limit`."""
        logw = np.log(np.asarray(self.widths, float))

        def fit(values):  # (S, W, seeds, ...) -> (S, ...)
            mean = np.log(np.maximum(np.mean(np.asarray(values), axis=2), 1e-300))
            centered = logw - logw.mean()
            return np.tensordot(centered, mean - mean.mean(axis=1, keepdims=True),
                                axes=([0], [1])) / (centered @ centered)

        gap = np.abs(np.asarray(self.test_loss) - np.asarray(self.lazy_limit)) / np.asarray(
            self.lazy_limit)
        return {"kernel_distance": fit(self.kernel_distance),
                "kernel_drift": fit(self.kernel_drift), "lazy_gap": fit(gap)}

    def table(self) -> str:
        """Seed means per setting and width, and the fitted slopes beside the known rates."""
        slopes = self.slopes()
        lines = [f"{'setting':<22} {'width':>6} {'‖K₀−Θ‖/‖Θ‖':>11} {'drift':>9} "
                 f"{'test':>9} {'lazy K₀':>9} {'lazy Θ':>9}"]
        for s, (param, g) in enumerate(self.settings):
            name = f"{param}, γ₀={g:g}"
            for w, width in enumerate(self.widths):
                row = [np.mean(np.asarray(a)[s, w], axis=0) for a in (
                    self.kernel_distance, self.kernel_drift, self.test_loss, self.lazy_own,
                    self.lazy_limit)]
                lines.append(f"{name:<22} {width:>6} {row[0][-1]:>11.3e} {row[1]:>9.2e} "
                             f"{row[2]:>9.3e} {row[3]:>9.3e} {row[4]:>9.3e}")
        lines.append("")
        lines.append(f"{'log-log slope vs width':<22} {'measured':>30} {'known':>8}")
        for s, (param, g) in enumerate(self.settings):
            name = f"{param}, γ₀={g:g}"
            per_layer = ", ".join(f"{v:+.2f}" for v in slopes["kernel_distance"][s])
            lines.append(f"{name:<22} kernel distance (per layer, total): {per_layer}   "
                         f"{KNOWN_SLOPES['kernel_distance']:+.1f}")
            lines.append(f"{'':<22} kernel drift: {slopes['kernel_drift'][s]:+.2f}   "
                         f"{KNOWN_SLOPES['kernel_drift']:+.1f} (ntk)")
            lines.append(f"{'':<22} |test − lazy Θ| / lazy Θ: {slopes['lazy_gap'][s]:+.2f}   "
                         f"{KNOWN_SLOPES['lazy_gap']:+.1f} (ntk)")
        return "\n".join(lines)


def _rel(a, b):
    return jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())


def _one(net: ReLUNet, X, y, Xs, ys, steps: int, eta0):
    lr = natural_lr(net, eta0)
    run = simulate(net, X, y, steps=steps, lr=lr, record_every=steps, test=(Xs, ys),
                   observables=("kernel_drift", "test_loss"))
    c = limit_normalization(net)
    finite, lim = layer_kernels(net, X), limit_kernels(net, X)
    L = net.depth
    dist = [_rel(c["K"][l] * finite.K[l], lim.K[l]) for l in range(L)]
    dist.append(_rel(sum(c["K"][l] * finite.K[l] for l in range(L)), lim.total))
    # Θ in the network's own units: K ≈ Σ_l Θ_l / c_l.
    theta = sum(lim.K[l] / c["K"][l] for l in range(L))
    theta_s = sum(k / c["K"][l] for l, k in enumerate(limit_kernels(net, Xs, X).K))
    f0, fs0 = net(X), net(Xs)
    own = lazy_predictions(finite.total, y, f0, lr=lr, steps=steps,
                           K_test=layer_kernels(net, Xs, X).total, f0_test=fs0)
    limit = lazy_predictions(theta, y, f0, lr=lr, steps=steps, K_test=theta_s, f0_test=fs0)

    def test_loss(f):
        return 0.5 * jnp.sum((f - ys) ** 2)

    return (jnp.stack(dist), run.observables["kernel_drift"][-1],
            run.observables["test_loss"][-1], test_loss(own.test[-1]),
            test_loss(limit.test[-1]), run.loss[-1])


def limit_study(
    X: Float[Array, "P d"],
    y: Float[Array, " P"],
    X_test: Float[Array, "Q d"],
    y_test: Float[Array, " Q"],
    *,
    widths: Sequence[int],
    depth: int = 2,
    seeds: Sequence[int] = (0, 1, 2),
    settings: Sequence[tuple[str, float]] = (("ntk", 1.0), ("mean_field", 1.0),
                                             ("mean_field", 0.1)),
    steps: int = 200,
    eta0: float = 0.5,
    progress: bool = True,
) -> LimitStudy:
    """Finite networks of growing width against their infinite-width limit (I11).

    For each setting `(parametrization, γ₀)`, width and seed: a network
    `ReLUNet.init(key(seed), d, (width,) * depth, parametrization=..., gamma0=γ₀)` is
    compared with `limit_kernels` at initialization, trained by `steps` steps of gradient
    descent with `η = natural_lr(net, eta0)` (test sites riding along), and its test loss is
    compared with the lazy predictions from its own `K₀` and from the limit `Θ` after the same
    steps.

    **Arguments:** training data `X`, `y`, test data `X_test`, `y_test` (scalar targets);
    `widths`, `depth`, `seeds`; `settings`: pairs `(parametrization, γ₀)`; `steps`; `eta0`;
    `progress`: a progress bar over the runs.

    **Returns:** a `LimitStudy`; `.table()` prints means and fitted log-log slopes beside the
    known rates, `.slopes()` returns them.
    """
    X, y = check_data(X, y)
    X_test, y_test = check_data(X_test, y_test)
    if y.ndim != 1:
        raise ValueError("`limit_study` takes scalar targets y of shape (P,).")
    settings = tuple((str(p), float(g)) for p, g in settings)
    widths, seeds = tuple(int(w) for w in widths), tuple(int(s) for s in seeds)
    runs = [(s, w, k) for s in range(len(settings)) for w in range(len(widths))
            for k in range(len(seeds))]
    out = [[[None] * len(seeds) for _ in widths] for _ in settings]
    bar = progress_bar(len(runs), progress, desc="limit study")
    for s, w, k in runs:
        param, g = settings[s]
        net = ReLUNet.init(jax.random.key(seeds[k]), X.shape[1], (widths[w],) * depth,
                           parametrization=param, gamma0=g, dtype=X.dtype)
        out[s][w][k] = _one(net, X, y, X_test, y_test, steps, eta0)
        bar.update(1)
    bar.close()
    fields = [jnp.stack([jnp.stack([jnp.stack([o[i] for o in row]) for row in setting])
                         for setting in out]) for i in range(6)]
    return LimitStudy(*fields, settings=settings, widths=widths, seeds=seeds)
