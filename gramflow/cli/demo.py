"""Built-in datasets and the `gramflow demo` main job."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from .._version import __version__
from ..dynamics.engines import Collective, Weights
from ..dynamics.sweep import sweep
from ..fields.kernels import collective_kernel
from ..model.network import ReLUNet
from ..studies.closure import CLOSURES, closure_study
from ..studies.data import EXAMPLES_HINT, load_digits, teacher_student

SIZES = {
    "tiny": dict(teacher=24, digits=32, widths=(8, 16), depths=(1, 2), steps=20, seeds=(0,)),
    "small": dict(teacher=64, digits=64, widths=(16, 64, 256), depths=(1, 2, 3), steps=200,
                  seeds=(0,)),
    "large": dict(teacher=512, digits=1024, widths=(64, 256, 1024, 4096), depths=(1, 2, 3),
                  steps=2000, seeds=(0, 1, 2)),
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
    return dict(name=name, X=X, y=y, lr=lr, runs=runs, closures=closures,
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


def save_results(out, results, rows, cfg) -> str:

    arrays = {}
    for res in results:
        p = res["name"]
        arrays[f"{p}_loss"] = np.asarray(res["runs"].loss)
        arrays[f"{p}_step"] = np.asarray(res["runs"].step)
        for key, value in res["runs"].observables.items():
            arrays[f"{p}_{key}"] = np.asarray(value)
        arrays[f"{p}_closure_error"] = np.asarray(res["closures"].error)
    np.savez(os.path.join(out, "results.npz"), **arrays)
    meta = dict(
        gramflow=__version__, jax=jax.__version__, size=cfg,
        datasets={r["name"]: dict(samples=int(r["X"].shape[0]), in_dim=int(r["X"].shape[1]),
                                   lr=r["lr"], seconds=r["seconds"]) for r in results},
        closures=CLOSURES, depth_count="L = hidden (trained) layers; weight layers = L + 1",
        loss="½ Σ r² (sum-reduced); lr is η of W ← W − η ∂L/∂W",
        summary=[{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                  for k, v in r.items()} for r in rows],
        arrays="results.npz: <dataset>_<observable> of shape (depth, width, seed, lr, T, ...); "
               "<dataset>_closure_error of shape (closure, depth, width, seed, T)",
    )
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return path
