"""Built-in datasets and the `gramflow demo` main job."""

from __future__ import annotations

import functools
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._version import __version__
from ..dynamics.batch import vmap_keys
from ..dynamics.engines import Collective, Weights
from ..dynamics.sweep import sweep
from ..fields.kernels import collective_kernel, layer_kernels
from ..fields.limits import limit_kernels
from ..model.network import ReLUNet
from ..studies.closure import CLOSURES, closure_study
from ..studies.data import EXAMPLES_HINT, load_digits, teacher_student  # noqa: F401 (main)
from ..studies.plots import _plt, _save

#: per size: samples of each dataset, the training grid, and the widths and seeds at which
#: the kernel at initialization is compared with its infinite-width limit (`limit_widths`,
#: `limit_seeds`; no training there, so wider than the grid is cheap)
SIZES = {
    "tiny": {"teacher": 24, "digits": 32, "widths": (8, 16), "depths": (1, 2), "steps": 20,
             "seeds": (0,), "limit_widths": (16, 64, 256), "limit_seeds": 4},
    "small": {"teacher": 64, "digits": 64, "widths": (16, 64, 256), "depths": (1, 2, 3),
              "steps": 200, "seeds": (0,), "limit_widths": (16, 64, 256, 1024), "limit_seeds": 8},
    "large": {"teacher": 512, "digits": 1024, "widths": (64, 256, 1024, 4096),
              "depths": (1, 2, 3), "steps": 2000, "seeds": (0, 1, 2),
              "limit_widths": (64, 256, 1024, 4096), "limit_seeds": 8},
}


def dataset(name: str, samples: int, *, seed: int = 0):
    """`"teacher"` (seeded teacher–student task, d = 8) or `"digits"`."""
    if name == "teacher":
        return teacher_student(jax.random.key(seed), samples=samples, in_dim=8)
    if name == "digits":
        return load_digits(samples=samples, key=jax.random.key(seed))
    raise ValueError(f"unknown dataset {name!r}; expected 'teacher' or 'digits'.")


def stable_lr(X, depths, widths, fraction: float = 0.5) -> float:
    """`fraction / λ_max(K₀)`, the largest λ_max over depths at the largest width (seed 0):
    below `2/λ_max` gradient descent on `½ Σ r²` is stable near the start."""
    lam = 0.0
    for L in depths:
        net = ReLUNet.init(jax.random.key(0), X.shape[1], (max(widths),) * L, dtype=X.dtype)
        lam = max(lam, float(jnp.linalg.eigvalsh(collective_kernel(net, X))[-1]))
    return fraction / lam


def limit_distance(X, depth: int, widths, seeds: int) -> np.ndarray:
    """Distance of the kernel at initialization from its infinite-width limit, against width:
    `‖K_l(0) − Θ_l‖ / ‖Θ_l‖` per hidden layer l and, last, of the sum of the layers, for the
    demo's networks `ReLUNet.init(jax.random.key(s), d, (width,) * depth)` (ntk, where `K_l`
    itself converges: `limit_normalization` is 1) with `s = 0 … seeds − 1`; the first
    quantity of `gramflow.diagnostics.limit_study`, without its training runs. `Θ_l =
    limit_kernels(net, X).K[l]`. Fluctuations of K₀ around Θ shrink like `N^{-1/2}` (Lee et
    al. 2019).

    **Returns:** `(len(widths), seeds, depth + 1)`, from one compiled program that maps over
    the seeds (one seed's networks in memory at a time).
    """
    widths = tuple(int(w) for w in widths)
    key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(s)))
                         for s in range(seeds)])
    out = _limit_distance(X, key_data, int(depth), widths)  # (seeds, widths, depth + 1)
    return np.asarray(out).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _limit_distance(X, key_data, depth, widths):
    d = X.shape[1]
    # The limit ignores the widths and weights: one for every width.
    lim = limit_kernels(ReLUNet.init(jax.random.key(0), d, (1,) * depth, dtype=X.dtype), X)
    statics = {}

    def init(key, w):
        arrays, statics[w] = eqx.partition(ReLUNet.init(key, d, (w,) * depth, dtype=X.dtype),
                                           eqx.is_array)
        return arrays

    def one_seed(k):
        # The networks of every width from one draw of random bits (cheap to compile).
        arrays = vmap_keys([functools.partial(init, w=w) for w in widths], k[None])
        out = []
        for w, a in zip(widths, arrays):
            K = layer_kernels(eqx.combine(jax.tree.map(lambda x: x[0], a), statics[w]), X).K
            out.append(jnp.stack([*(_rel(K[l], lim.K[l]) for l in range(depth)),
                                  _rel(sum(K[1:], K[0]), lim.total)]))
        return jnp.stack(out)

    return jax.lax.map(one_seed, key_data)


def _rel(a, b):
    return jnp.linalg.norm(a - b) / jnp.linalg.norm(b)


def log_slope(widths, values) -> float:
    """Least-squares slope of `log values` against `log widths`."""
    return float(np.polyfit(np.log(np.asarray(widths, float)), np.log(values), 1)[0])


def run_dataset(name, X, y, cfg, *, progress=True):
    """One dataset: the exact collective engine beside the weights, and the closures."""
    depths, widths, steps = cfg["depths"], cfg["widths"], cfg["steps"]
    lr = stable_lr(X, depths, widths)
    record_every = max(1, steps // 10)
    t0 = time.perf_counter()
    runs = sweep(X, y, widths=widths, depths=depths, seeds=cfg["seeds"], lrs=(lr,), steps=steps,
                 record_every=record_every, engine=Collective(), reference=Weights(),
                 observables=("loss", "kernel_share", "kernel_drift", "kernel_eigs"),
                 top_m=X.shape[0], progress=progress)
    closures = closure_study(X, y, depths=depths, widths=widths, seeds=cfg["seeds"],
                             steps=steps, lr=lr, record_every=record_every, progress=progress,
                             exact_loss=False)
    # The distance of the kernel at initialization from its infinite-width limit.
    limit = {"depth": max(depths), "widths": tuple(cfg["limit_widths"]),
             "seeds": cfg["limit_seeds"]}
    limit["distance"] = limit_distance(X, **limit)
    return dict(name=name, X=X, y=y, lr=lr, runs=runs, closures=closures, limit=limit,
                seconds=time.perf_counter() - t0)


def summary_rows(result) -> list[dict]:
    runs, closures = result["runs"], result["closures"]
    rows = []
    for i, L in enumerate(runs.depths):
        for j, w in enumerate(runs.widths):
            row = dict(
                dataset=result["name"], depth=L, width=w,
                loss_start=float(runs.loss[i, j, :, 0, 0].mean()),
                loss_end=float(runs.loss[i, j, :, 0, -1].mean()),
                kernel_drift=float(runs.observables["kernel_drift"][i, j, :, 0, -1].mean()),
                collective_vs_weights=float(
                    runs.observables["closure_error"][i, j, :, 0].max()),
            )
            for c, name in enumerate(closures.closures):
                row[name] = float(closures.error[c, i, j, :, -1].mean())
            rows.append(row)
    return rows


def format_table(rows) -> str:
    cols = ["dataset", "depth", "width", "loss_start", "loss_end", "kernel_drift",
            "collective_vs_weights", *CLOSURES]
    heads = ["data", "L", "width", "loss(0)", "loss(T)", "K drift", "exact err", "local",
             "frozen ops", "frozen K", "full tr."]
    out = ["  ".join(f"{h:>10}" for h in heads)]
    note = any(not np.isfinite(r[c]) for r in rows for c in CLOSURES)
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, (str, int)):
                cells.append(f"{v:>10}")
            else:  # a closure model can blow up: say so rather than print nan
                cells.append(f"{v:>10.2e}" if np.isfinite(v) else f"{'diverged':>10}")
        out.append("  ".join(cells))
    if note:
        out.append("('diverged': that closure's residual stopped being finite — the model, not "
                   "the network, blew up)")
    return "\n".join(out)


def limit_figure(out, results) -> str:
    """`limit_distance_vs_width.png`: per dataset, `‖K_l(0) − Θ_l‖ / ‖Θ_l‖` per layer and of
    the total kernel against width (mean over seeds, log-log), with the `N^{-1/2}` rate."""
    plt = _plt()
    from matplotlib.ticker import NullLocator
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True)
    for ax, res in zip(np.atleast_1d(axes), results):
        lim = res["limit"]
        widths, mean = np.asarray(lim["widths"], float), lim["distance"].mean(axis=1)
        L = lim["depth"]
        for l in range(L):
            ax.loglog(widths, mean[:, l], "o-", ms=3, lw=1, label=f"K_{l + 1}")
        ax.loglog(widths, mean[:, -1], "o-", color="k", lw=2,
                  label=f"K (total), slope {log_slope(widths, mean[:, -1]):+.2f}")
        ref = mean[0, -1] * (widths / widths[0]) ** -0.5
        ax.loglog(widths, ref, ":", color="0.4", label=r"$\propto N^{-1/2}$")
        ax.set_xticks(widths, [str(int(w)) for w in widths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("width N")
        ax.set_title(f"{res['name']}: L = {L}, {lim['seeds']} seeds", fontsize=9)
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("‖K_l(0) − Θ_l‖ / ‖Θ_l‖")
    fig.suptitle("distance of the kernel at initialization from its infinite-width limit Θ",
                 fontsize=10)
    return _save(fig, out, "limit_distance_vs_width.png")


def save_results(out, results, rows, cfg) -> str:
    """`results.npz` and `results.json` in `out`."""
    arrays = {}
    for res in results:
        p = res["name"]
        arrays[f"{p}_loss"] = np.asarray(res["runs"].loss)
        arrays[f"{p}_step"] = np.asarray(res["runs"].step)
        for key, value in res["runs"].observables.items():
            arrays[f"{p}_{key}"] = np.asarray(value)
        arrays[f"{p}_closure_error"] = np.asarray(res["closures"].error)
        arrays[f"{p}_limit_distance"] = res["limit"]["distance"]
    np.savez(os.path.join(out, "results.npz"), **arrays)
    limits = {}
    for r in results:
        lim = r["limit"]
        limits[r["name"]] = {"depth": lim["depth"], "widths": list(lim["widths"]),
                             "seeds": lim["seeds"], "slope_total": log_slope(
                                 lim["widths"], lim["distance"][..., -1].mean(axis=1))}
    meta = dict(
        gramflow=__version__, jax=jax.__version__, size=cfg,
        datasets={r["name"]: dict(samples=int(r["X"].shape[0]), in_dim=int(r["X"].shape[1]),
                                   lr=r["lr"], seconds=r["seconds"]) for r in results},
        closures=CLOSURES, depth_count="L = hidden (trained) layers; weight layers = L + 1",
        loss="½ Σ r² (sum-reduced); lr is η of W ← W − η ∂L/∂W",
        summary=[{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                  for k, v in r.items()} for r in rows],
        limit={**limits, "known_slope": -0.5,
               "quantity": "‖c_l K_l(0) − Θ_l‖/‖Θ_l‖ per layer and of the total (last), "
                           "Θ = limit_kernels(net, X); slope_total: log-log slope against "
                           "width of the seed mean of the total"},
        arrays="results.npz: <dataset>_<observable> of shape (depth, width, seed, lr, T, ...); "
               "<dataset>_closure_error of shape (closure, depth, width, seed, T); "
               "<dataset>_limit_distance of shape (limit width, limit seed, layer + total)",
    )
    print("\ndistance of K₀ from its infinite-width limit Θ, log-log slope against width "
          "(known rate −0.5): " + ", ".join(
              f"{k} {v['slope_total']:+.2f} (L = {v['depth']}, widths {v['widths'][0]}…"
              f"{v['widths'][-1]})" for k, v in limits.items()))
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return path
