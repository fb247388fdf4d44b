"""Sweeps over depths, widths, seeds and learning rates: vmapped, padded, chunked, sharded and
resumable."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._checks import check_inputs
from ._network import PARAMETRIZATIONS, ReLUNet
from ._observables import validate
from ._simulate import _check_engines, simulate
from ._structure import structure_kwargs

# Observables with one entry per hidden layer: padded with NaN up to the deepest network.
_PER_LAYER = {"kernel_trace", "kernel_share", "active_fraction", "coactivation_drift",
              "balance_drift", "layer_kernel_eigs", "field_error"}


class SweepResult(eqx.Module):
    """Recorded observables over a grid of configurations.

    **Fields:**

    - `loss`: `(len(depths), len(widths), len(seeds), len(lrs), T)`.
    - `observables`: dict of the other recorded observables, each with those five leading
      axes and then the observable's own shape (`gramflow.OBSERVABLES`); per-layer ones are
      padded with NaN to the largest depth.
    - `first_nonfinite`: `(len(depths), len(widths), len(seeds), len(lrs))`, −1 if finite.
    - `step`: `(T,)` steps of the records.
    - `depths`, `widths`, `seeds`: the grid (widths as per-layer tuples per depth,
      `arch[i][j]` for depth i and width j); `lrs`: `(len(lrs),)`.
    """

    loss: Float[Array, "D W S R T"]
    observables: dict[str, Array]
    first_nonfinite: Int[Array, "D W S R"]
    step: Int[Array, " T"]
    lrs: Float[Array, " R"]
    depths: tuple[int, ...] = eqx.field(static=True)
    widths: tuple = eqx.field(static=True)
    seeds: tuple[int, ...] = eqx.field(static=True)
    arch: tuple = eqx.field(static=True)


def _architectures(widths, depths) -> list[list[tuple[int, ...]]]:
    """`arch[i][j]`: per-layer widths for depth i and width entry j."""
    if len(widths) == 0 or len(depths) == 0:
        raise ValueError("`widths` and `depths` must be non-empty.")
    out = []
    for L in depths:
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L <= 0:
            raise ValueError(f"`depths` entries must be positive ints, got {L!r}.")
        row = []
        for w in widths:
            if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
                arch = (int(w),) * int(L)
            else:
                arch = tuple(int(n) for n in w)
                if len(arch) != L:
                    raise ValueError(
                        f"width {tuple(w)} lists {len(arch)} per-layer widths but the sweep "
                        f"has depth {L}; give per-layer widths only with a matching depth."
                    )
            if any(n <= 0 for n in arch):
                raise ValueError(f"widths must be positive, got {arch}.")
            row.append(arch)
        out.append(row)
    return out


def pad_network(net: ReLUNet, widths: Sequence[int]) -> ReLUNet:
    """Zero-pad the hidden layers of `net` to `widths` (DESIGN.md §4): padded units get zero
    incoming and outgoing weights and zero readout, so they stay exactly inactive
    (relu'(0) = 0) and every trajectory is unchanged; the scales keep the true widths. Masks
    are zero-padded too; gains and skip strengths are kept (a skip path needs the padded layer
    to stay square)."""
    weights, fan_in = [], net.in_dim
    for W, n in zip(net.weights, widths):
        weights.append(jnp.zeros((n, fan_in), W.dtype).at[: W.shape[0], : W.shape[1]].set(W))
        fan_in = n
    a = net.readout
    readout = jnp.zeros((widths[-1], *a.shape[1:]), a.dtype).at[: a.shape[0]].set(a)
    masks = None if net.masks is None else tuple(
        None if m is None else m.padded(w.shape) for m, w in zip(net.masks, weights))
    return ReLUNet(weights, readout, net.scales, net.parametrization, masks=masks,
                   gains=net.gains, skips=net.skips, train=net.train)


def _default_max_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(0.5 * stats["bytes_limit"])
    return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _bytes_per_config(arch, P, d, k, T, names, top_m, itemsize) -> int:
    """A generous estimate of the memory one configuration needs while it runs."""
    sizes = (d, *arch)
    params = sum(a * b for a, b in zip(sizes[1:], sizes[:-1]))
    fields = 12 * P * sum(arch) * (1 + k)
    records = T * (P * k + 8 * len(arch) + top_m * (len(arch) + 1))
    kernels = 0
    if {"kernel", "kernel_eigs", "kernel_drift", "alignment", "coactivation_drift",
            "layer_kernel_eigs"} & set(names):
        kernels = (len(arch) + 4) * (P * k) ** 2 + (T * (P * k) ** 2 if "kernel" in names else 0)
    ops = 0
    if "operator_drift" in names:
        ops = 3 * sum(P * P * n * n for n in arch)
    return 2 * itemsize * (4 * params + fields + records + kernels + ops)


def _fingerprint(X, y, config) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(X).tobytes())
    h.update(np.asarray(y).tobytes())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _run_chunk(fn, nets, lrs, sharding):
    """Run one chunk of configurations (a hook the resumability test interrupts)."""
    if sharding is not None:
        nets, lrs = jax.device_put((nets, lrs), sharding)
    return jax.tree.map(np.asarray, fn(nets, lrs))


def _atomic_save(directory, stem, arrays, meta) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, os.path.join(directory, stem + ".npz"))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, stem + ".json"))  # the JSON marks it finished


def _load_chunk(directory, stem, fingerprint):
    meta_path = os.path.join(directory, stem + ".json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"`out` = {directory!r} holds chunks of a different sweep (fingerprint "
            f"{meta.get('fingerprint')} ≠ {fingerprint}); pass another directory or empty it."
        )
    with np.load(os.path.join(directory, stem + ".npz")) as data:
        return {key: data[key] for key in data.files}


def _progress(total, enabled):
    from ._closure import _progress as bar

    return bar(total, enabled, desc="sweep chunks", unit="chunk")


def sweep(
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    widths: Sequence,
    depths: Sequence[int],
    seeds: Sequence[int],
    lrs: Sequence[float],
    steps: int,
    engine: str = "weights",
    parametrization: str = "ntk",
    out_dim: int | None = None,
    observables: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    record_every: int = 1,
    top_m: int = 5,
    reference: str | None = None,
    transport: int | None = None,
    operators: str = "current",
    structure: dict | Callable[[int, tuple[int, ...]], dict] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Gradient descent (`simulate`) over the grid depths × widths × seeds × lrs.

    Seeds and learning rates run through `jax.vmap`; widths too, by exact zero-padding to the
    largest width (DESIGN.md §4, `pad_network`), with the scales from the true widths as
    traced leaves; each depth compiles once. The configurations of a depth are split into
    chunks that fit `max_bytes` (default: half the accelerator's memory, or a quarter of the
    host's RAM on CPU), run one compiled call per chunk with a progress bar, and, with more
    than one device, sharded over the devices along the configuration axis
    (`jax.sharding.Mesh` + `NamedSharding`).

    **Arguments:**

    - `X` `(P, d)`, `y` `(P,)` or `(P, k)`: the data; networks are `ReLUNet.init(
      jax.random.key(seed), d, arch, out_dim=out_dim, parametrization=...)`.
    - `widths`: entries are an int (every hidden layer that wide) or a tuple of per-layer
      widths (whose length must equal the depth).
    - `depths`: numbers of hidden layers L. `seeds`: ints. `lrs`: step sizes η of
      `W ← W − η ∂L/∂W` on `L = ½ Σ r²`.
    - `steps`, `record_every`, `engine`, `observables`, `top_m`, `reference`, `transport`,
      `operators`: as in `simulate`.
    - `structure`: structured layers for every network — a dict of `ReLUNet.init` keyword
      arguments (`gains`, `skips`, `train`, `masks`), or a function `(d, widths) -> dict`
      for what depends on the architecture (masks). Networks whose static structure differs
      (e.g. masks of different widths) cannot share one vmap: each such group compiles
      separately.
    - `out`: a directory; each finished chunk is written there atomically (npz + JSON with its
      grid coordinates, versions and a fingerprint of the sweep) and a rerun loads finished
      chunks instead of recomputing them.

    **Returns:** a `SweepResult` with arrays `(len(depths), len(widths), len(seeds),
    len(lrs), T, ...)`.
    """
    from . import __version__

    widths, depths, seeds = tuple(widths), tuple(depths), tuple(int(s) for s in seeds)
    arch = _architectures(widths, depths)
    if not seeds:
        raise ValueError("`seeds` must be non-empty.")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; expected one of "
                         f"{PARAMETRIZATIONS}.")
    X = jnp.asarray(X)
    probe = ReLUNet.init(jax.random.key(0), X.shape[-1] if X.ndim == 2 else 1, (1,),
                         out_dim=out_dim, dtype=X.dtype if jnp.issubdtype(X.dtype, jnp.floating) else None)
    X, y = check_inputs(probe, X, y)
    lr_values = np.asarray(lrs, dtype=np.float64).reshape(-1)
    if lr_values.size == 0 or not np.all(np.isfinite(lr_values)) or np.any(lr_values <= 0):
        raise ValueError(f"`lrs` must be non-empty, positive and finite, got {lrs!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    _check_engines(engine, reference, None, transport, operators)
    names = validate(observables, engine=engine, top_m=top_m)
    P, d = X.shape
    k = 1 if out_dim is None else out_dim
    T = steps // record_every + 1 + (steps % record_every > 0)
    budget = _default_max_bytes() if max_bytes is None else int(max_bytes)
    devices = jax.devices()
    n_dev = len(devices)
    sharding = None
    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("configs",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("configs"))
    lrs_arr = jnp.asarray(lr_values, X.dtype)
    n_configs = len(widths) * len(seeds) * len(lr_values)

    seed_keys = jnp.stack([jax.random.key(s) for s in seeds])
    plans, struct_desc = [], []
    for i, L in enumerate(depths):
        padded = tuple(max(a[l] for a in arch[i]) for l in range(L))
        per = _bytes_per_config(padded, P, d, k, T, names, top_m, X.dtype.itemsize)
        if per > budget:
            raise ValueError(
                f"one configuration at depth {L} (widths up to {padded}) needs about "
                f"{per:,} bytes, above max_bytes = {budget:,}; reduce P, the widths, or the "
                "recorded observables."
            )
        # Networks of one depth; those with equal static structure share a vmap, zero-padded
        # to the group's largest widths.
        nets, groups = [], {}
        for w, a in enumerate(arch[i]):
            kw = structure_kwargs(structure, d, a)
            struct_desc.append(repr(sorted(kw.items())))
            net = jax.vmap(lambda key, a=a, kw=kw: ReLUNet.init(
                key, d, a, out_dim=out_dim, parametrization=parametrization, dtype=X.dtype,
                **kw))(seed_keys)
            nets.append(net)
            groups.setdefault(jax.tree.structure(net), []).append(w)
        chunk = max(1, min(n_configs, budget // per))
        chunk = -(-chunk // n_dev) * n_dev if chunk >= n_dev else n_dev  # whole devices
        parts = []
        for g, ws in enumerate(groups.values()):
            pad_to = tuple(max(arch[i][w][l] for w in ws) for l in range(L))
            group = [jax.vmap(lambda n: pad_network(n, pad_to))(nets[w]) for w in ws]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *group)  # (W, S, ...)
            n = len(ws) * len(seeds) * len(lr_values)
            parts.append((g, ws, stacked, -(-n // chunk), pad_to))
        plans.append((padded, chunk, parts))

    config = dict(widths=[list(a) for row in arch for a in row], depths=depths, seeds=seeds,
                  lrs=lr_values.tolist(), steps=steps, engine=engine, record_every=record_every,
                  parametrization=parametrization, out_dim=out_dim, names=names, top_m=top_m,
                  reference=reference, transport=transport, operators=operators,
                  chunks=[p[1] for p in plans], dtype=str(X.dtype), structure=struct_desc)
    fingerprint = _fingerprint(X, y, config)
    if out is not None:
        os.makedirs(out, exist_ok=True)

    def single(net, lr):
        traj = simulate(net, X, y, steps=steps, lr=lr, engine=engine, observables=names,
                        record_every=record_every, top_m=top_m, reference=reference,
                        transport=transport, operators=operators)
        return {"loss": traj.loss, **({"r": traj.r} if traj.r is not None else {}),
                **traj.observables, "first_nonfinite": traj.first_nonfinite,
                "step": traj.step}

    fn = jax.jit(jax.vmap(single))
    bar = _progress(sum(p[3] for plan in plans for p in plan[2]), progress)
    per_depth = []
    for i, L in enumerate(depths):
        padded, chunk, parts = plans[i]
        merged = {}
        for g, ws, nets, n_chunks, pad_to in parts:
            grid = np.stack(np.unravel_index(np.arange(len(ws) * len(seeds) * len(lr_values)),
                                             (len(ws), len(seeds), len(lr_values))), axis=1)
            results = []
            for c in range(n_chunks):
                idx = grid[c * chunk:(c + 1) * chunk]
                stem = f"depth{L}_chunk{c:05d}" if len(parts) == 1 else f"depth{L}_group{g}_chunk{c:05d}"
                done = _load_chunk(out, stem, fingerprint) if out is not None else None
                if done is None:
                    fill = np.concatenate([idx, np.repeat(idx[-1:], chunk - len(idx), 0)])
                    batch = jax.tree.map(lambda a: a[fill[:, 0], fill[:, 1]], nets)
                    done = _run_chunk(fn, batch, lrs_arr[fill[:, 2]], sharding)
                    done = {key: v[: len(idx)] for key, v in done.items()}
                    if out is not None:
                        meta = dict(
                            fingerprint=fingerprint, depth=L, chunk=c,
                            configs=[dict(width=list(arch[i][ws[w]]), seed=seeds[s],
                                          lr=float(lr_values[r])) for w, s, r in idx],
                            gramflow=__version__, jax=jax.__version__,
                        )
                        _atomic_save(out, stem, done, meta)
                results.append(done)
                bar.update(1)
            for key in results[0]:
                v = np.concatenate([r[key] for r in results])
                v = v.reshape((len(ws), len(seeds), len(lr_values)) + v.shape[1:])
                if key not in merged:
                    merged[key] = np.zeros((len(widths),) + v.shape[1:], v.dtype)
                if key == "active_fraction":  # padded units count as inactive: rescale
                    true = np.array([arch[i][w] for w in ws], np.float64)
                    v = v * (np.array(pad_to) / true)[:, None, None, None, :]
                merged[key][ws] = v
        per_depth.append(merged)
    bar.close()

    L_max = max(depths)

    def stack(key):
        arrays = []
        for merged, L in zip(per_depth, depths):
            a = merged[key]
            if key in _PER_LAYER and a.shape[4] < L_max:
                pad = [(0, 0)] * a.ndim
                pad[4] = (0, L_max - a.shape[4])
                a = np.pad(a.astype(np.float64 if a.dtype == np.float64 else a.dtype), pad,
                           constant_values=np.nan)
            arrays.append(a)
        return jnp.asarray(np.stack(arrays))

    keys = [key for key in per_depth[0] if key not in ("loss", "first_nonfinite", "step")]
    return SweepResult(
        loss=stack("loss"),
        observables={key: stack(key) for key in keys},
        first_nonfinite=stack("first_nonfinite"),
        step=jnp.asarray(per_depth[0]["step"].reshape(-1, T)[0]),
        lrs=lrs_arr,
        depths=depths,
        widths=widths,
        seeds=seeds,
        arch=tuple(tuple(row) for row in arch),
    )

