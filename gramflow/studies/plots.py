"""Figures of the demo and the command line (matplotlib, from the `examples` extra)."""

from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out, name) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def demo_figures(out: str, result) -> list[str]:
    """Loss curves, kernel shares over time, spectra at start and end, kernel drift vs width,
    closure error vs depth, for one dataset's demo result."""
    plt = _plt()
    runs, closures, name = result["runs"], result["closures"], result["name"]
    steps = np.asarray(runs.step)
    depths, widths = runs.depths, runs.widths
    paths = []

    fig, axes = plt.subplots(1, len(depths), figsize=(3.4 * len(depths), 3), sharey=True)
    for ax, i in zip(np.atleast_1d(axes), range(len(depths))):
        for j, w in enumerate(widths):
            ax.semilogy(steps, np.asarray(runs.loss[i, j, 0, 0]), label=f"width {w}")
        ax.set_title(f"L = {depths[i]} hidden layers", fontsize=9)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("loss ½ Σ r²")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"{name}: loss (collective engine, exact)", fontsize=10)
    paths.append(_save(fig, out, f"{name}_loss_curves.png"))

    share = np.asarray(runs.observables["kernel_share"])
    fig, axes = plt.subplots(1, len(depths), figsize=(3.4 * len(depths), 3), sharey=True)
    for ax, i in zip(np.atleast_1d(axes), range(len(depths))):
        for l in range(depths[i]):
            ax.plot(steps, share[i, -1, 0, 0, :, l], label=f"K_{l + 1}")
        ax.set_title(f"L = {depths[i]}, width {widths[-1]}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("tr K_l / tr K")
    fig.suptitle(f"{name}: per-layer kernel shares", fontsize=10)
    paths.append(_save(fig, out, f"{name}_kernel_shares.png"))

    eigs = np.asarray(runs.observables["kernel_eigs"])
    fig, axes = plt.subplots(1, len(depths), figsize=(3.4 * len(depths), 3), sharey=True)
    for ax, i in zip(np.atleast_1d(axes), range(len(depths))):
        for j, color in ((0, "C0"), (len(widths) - 1, "C3")):
            for t, style in ((0, "-"), (-1, "--")):
                ev = np.maximum(eigs[i, j, 0, 0, t], 1e-16)
                when = "start" if t == 0 else f"step {steps[-1]}"
                ax.semilogy(np.arange(1, ev.size + 1), ev, style, color=color,
                            label=f"width {widths[j]}, {when}")
        ax.set_title(f"L = {depths[i]}", fontsize=9)
        ax.set_xlabel("index")
        ax.legend(fontsize=6)
    np.atleast_1d(axes)[0].set_ylabel("eigenvalue of K")
    fig.suptitle(f"{name}: spectrum of the collective kernel at start and end", fontsize=10)
    paths.append(_save(fig, out, f"{name}_spectrum.png"))

    drift = np.asarray(runs.observables["kernel_drift"])[:, :, :, 0, -1].mean(axis=2)
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for i, L in enumerate(depths):
        ax.loglog(widths, drift[i], "o-", label=f"L = {L}")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("width")
    ax.set_ylabel("‖K(T) − K(0)‖ / ‖K(0)‖")
    ax.set_title(f"{name}: kernel drift vs width", fontsize=10)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, f"{name}_kernel_drift_vs_width.png"))

    err = np.asarray(closures.error)[:, :, -1, :, -1].mean(axis=-1)  # (closure, depth)
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for c, cname in enumerate(closures.closures):
        ax.semilogy(depths, np.maximum(err[c], 1e-17), "o-", label=cname)
    ax.set_xticks(depths)
    ax.set_xlabel("hidden layers L")
    ax.set_ylabel("‖r − r_exact‖ / ‖r_exact‖ at the end")
    ax.set_title(f"{name}: closure error vs depth (width {widths[-1]})", fontsize=10)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, f"{name}_closure_error_vs_depth.png"))
    return paths


def trajectory_figure(out: str, traj, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    x = np.asarray(traj.step if traj.step is not None else traj.t)
    ax.semilogy(x, np.asarray(traj.loss))
    ax.set_xlabel("step" if traj.step is not None else "t")
    ax.set_ylabel("loss ½ Σ r²")
    ax.set_title(title, fontsize=10)
    return _save(fig, out, "loss_curve.png")


def sweep_figure(out: str, result) -> str:
    plt = _plt()
    loss = np.asarray(result.loss)[..., -1].mean(axis=2)  # (depth, width, lr[, batch size])
    batches = getattr(result, "batch_sizes", None)
    if batches is None:
        loss, batches, named = loss[..., None], [None], False
    else:
        named = True
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    labels = [str(w) for w in result.widths]
    x = np.arange(len(labels))
    for i, L in enumerate(result.depths):
        for r, lr in enumerate(np.asarray(result.lrs)):
            for b, B in enumerate(batches):
                extra = f", B = {B or 'full'}" if named else ""
                ax.semilogy(x, loss[i, :, r, b], "o-", label=f"L = {L}, lr = {lr:g}{extra}")
    ax.set_xticks(x, labels)
    ax.set_xlabel("width")
    ax.set_ylabel("final loss (mean over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, out, "sweep_final_loss.png")
