"""Sweeps over depths, widths, seeds and learning rates: vmapped, padded, chunked, sharded and
resumable."""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._checks import check_data
from .._mask import Mask
from .._progress import progress_bar
from .._version import __version__
from ..model.network import PARAMETRIZATIONS, ReLUNet, _positive_int, structure_kwargs
from .batch import (
    flat_random_bits,
    pad_network,
    run_pairs,
    run_pairs_jit,
    vmap_keys,
    width_buckets,
    working_bytes,
)
from .engines import AbstractEngine, Weights
from .minibatch import BATCH_KEY, batch_key, batch_schedule
from .observables import dims_of, resolve
from .simulate import _check_engine, check_test_pair

_COST: dict = {}  # per-configuration memory of each program the driver has measured

#: the grid axes every array of a `SweepResult` starts with (then `batch_size` when the
#: sweep was given `batch_sizes`)
GRID_DIMS = ("depth", "width", "seed", "lr")



def _check_batch_sizes(batch_sizes, P: int) -> tuple:
    """`sweep(batch_sizes=)` as a tuple of `None` (full batch) and ints in [1, P]."""
    if batch_sizes is None:
        return (None,)
    if isinstance(batch_sizes, (int, np.integer)) or not isinstance(
            batch_sizes, (list, tuple, np.ndarray, range)):
        raise TypeError("`batch_sizes` must be a sequence of batch sizes (ints, or None for "
                        f"full batch), e.g. [None, 8, 32], got {batch_sizes!r}.")
    out = []
    for B in batch_sizes:
        if B is None:
            out.append(None)
            continue
        if isinstance(B, (bool, np.bool_)) or not isinstance(B, (int, np.integer)):
            raise TypeError(f"`batch_sizes` entries must be ints or None (full batch), got "
                            f"{B!r}.")
        if not 1 <= B <= P:
            raise ValueError(f"`batch_sizes` entries must be in [1, P] = [1, {P}] (a batch "
                             f"is drawn without replacement from the P samples), got {B!r}.")
        out.append(int(B))
    if not out:
        raise ValueError("`batch_sizes` must be non-empty (None: full batch).")
    if len(set(out)) != len(out):
        raise ValueError(f"`batch_sizes` lists a batch size twice: {list(batch_sizes)!r}.")
    return tuple(out)


def _check_test(test, X, out_dim):
    """`sweep(test=(X_test, y_test))` validated like `X`, `y` (columns and dtype of `X`)."""

    def check(Xt, yt):
        Xt, yt = check_data(Xt, yt, out_dim=out_dim)
        if Xt.shape[1] != X.shape[1]:
            raise ValueError(f"`X` has {Xt.shape[1]} columns, the training `X` has "
                             f"{X.shape[1]}.")
        if Xt.dtype != X.dtype:
            raise TypeError(f"`X` has dtype {Xt.dtype}, the training `X` has {X.dtype}.")
        return jax.device_put((np.asarray(Xt), np.asarray(yt)))

    return check_test_pair(test, check)


class SweepResult(eqx.Module):
    """Recorded observables over a grid of configurations; `D, W, S, R = len(depths),
    len(widths), len(seeds), len(lrs)` and `T` records. A sweep given `batch_sizes` has one
    more grid axis, `batch_size` (`NB = len(batch_sizes)`), after `lr`: read `(D, W, S, R)`
    below as `(D, W, S, R, NB)` then.

    **Fields:**

    - `loss`: `(D, W, S, R, T)`, `½ Σ r²` at each record (of the full training set, also
      for mini-batch runs).
    - `observables`: dict of the other recorded observables (`r` among them if recorded;
      `test_loss`, `test_error` by default with `test=`; `gradient_noise` by default with
      `batch_sizes` and an engine carrying fields), each `(D, W, S, R, T, ...)` with the
      observable's own shape last (`gramflow.OBSERVABLES`); per-layer ones are padded with
      NaN to the largest depth.
    - `first_nonfinite`: `(D, W, S, R)`, the first step with a non-finite value, −1 if none.
    - `step`: `(T,)`, the steps of the records.
    - `lrs`: `(R,)`, the learning rates, in the data's dtype.
    - `depths`: the numbers of hidden layers, as given (static).
    - `widths`: the width entries, as given: ints or per-layer tuples (static).
    - `seeds`: the seeds, as ints (static).
    - `arch`: `arch[i][j]`, the per-layer widths of depth `depths[i]` and width entry
      `widths[j]` (static).
    - `batch_sizes`: the batch sizes (`None`: full batch) of a sweep given `batch_sizes`,
      else `None` — and no `batch_size` axis (static).
    - `dims`: the name of every axis of `loss`, `first_nonfinite` and each observable,
      e.g. `("depth", "width", "seed", "lr", "record", "layer")` (static).

    With `out=` the driver also writes `result.npz` / `result.json` (arrays, grid, dims,
    versions, dtype, configuration); `SweepResult.load(out)` reads them back without
    rerunning anything.
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
    batch_sizes: tuple | None = eqx.field(static=True, default=None)
    dims: dict = eqx.field(static=True, default=None)

    def save(self, directory, meta: dict) -> None:
        """Write `result.npz` and `result.json` (with `meta`) to `directory`."""
        arrays = {"loss": self.loss, "first_nonfinite": self.first_nonfinite,
                  "step": self.step, "lrs": self.lrs,
                  **{f"observables/{k}": v for k, v in self.observables.items()}}
        grid = dict(depths=list(self.depths), seeds=list(self.seeds),
                    widths=[w if isinstance(w, int) else list(w) for w in self.widths],
                    arch=[[list(a) for a in row] for row in self.arch])
        if self.batch_sizes is not None:
            grid["batch_sizes"] = list(self.batch_sizes)
        dims = {**{k: list(v) for k, v in self.dims.items()}, "step": ["record"], "lrs": ["lr"]}
        _atomic_save(directory, "result", {k: np.asarray(v) for k, v in arrays.items()},
                     dict(meta, grid=grid, dims=dims, observables=list(self.observables)))

    @classmethod
    def load(cls, directory) -> SweepResult:
        """The result a finished `sweep(..., out=directory)` wrote, without rerunning it."""
        meta_path = os.path.join(directory, "result.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"{meta_path} does not exist: `SweepResult.load` reads the result a finished "
                "`sweep(..., out=...)` writes there; run (or finish) that sweep first.")
        meta = _read_meta(meta_path)
        arrays = {k: jnp.asarray(v) for k, v in _read_arrays(meta_path, meta).items()}
        grid = meta["grid"]
        widths = tuple(w if isinstance(w, int) else tuple(w) for w in grid["widths"])
        return cls(loss=arrays["loss"],
                   observables={k: arrays[f"observables/{k}"] for k in meta["observables"]},
                   first_nonfinite=arrays["first_nonfinite"], step=arrays["step"],
                   lrs=arrays["lrs"], depths=tuple(grid["depths"]), widths=widths,
                   seeds=tuple(grid["seeds"]),
                   arch=tuple(tuple(tuple(a) for a in row) for row in grid["arch"]),
                   batch_sizes=None if grid.get("batch_sizes") is None
                   else tuple(grid["batch_sizes"]),
                   dims={k: tuple(v) for k, v in meta["dims"].items()
                         if k not in ("step", "lrs")})


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


def _vmap_size(P, d, widths, devices) -> int:
    """Configurations run side by side in one `vmap`, the default of `sweep(vmap_size=)`:
    all on accelerators (and when sharded); on one CPU device the largest power of two that
    keeps a pass through the layers under 2¹⁹ multiply-adds (`P Σ_l N_l (N_{l-1} + 1)` per
    configuration), fastest there: XLA's batched products on CPU are slower than a sequence
    of plain ones for wide layers, faster for narrow ones."""
    if len(devices) > 1 or devices[0].platform != "cpu":
        return 1 << 62
    sizes = (d, *widths)
    work = P * sum(n * (m + 1) for n, m in zip(sizes[1:], sizes[:-1]))
    return 1 << max(0, math.floor(math.log2(2**19 / work)))


class _Now:
    """An executor that runs what it is given at once (one core: nothing to overlap)."""

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **_):
        pass


def _compiler_pool(n_programs: int):
    """Threads that compile a sweep's programs beside the thread that traces and runs them
    (XLA compiles without holding Python's lock): one per idle core, judged by the load
    average (compiling beside other work only slows both), none without one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average here
        busy = 0.0
    workers = min(n_programs, int(cores - 1 - busy + 0.5))
    return ThreadPoolExecutor(workers, thread_name_prefix="sweep-compile") if workers > 0 \
        else _Now()


def _default_max_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(0.5 * stats["bytes_limit"])
    return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _fingerprint(X, y, config) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(X).tobytes())
    h.update(np.asarray(y).tobytes())
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _describe(value):
    """A JSON description of a structure argument that changes with its content: masks and
    arrays by a digest of their values (`repr(Mask)` shows only shape and density)."""
    if isinstance(value, Mask):
        return {"mask": list(value.shape), "sha256": value.digest()}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(value)
        return {"array": list(a.shape), "dtype": str(a.dtype),
                "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
    return repr(value)


def _checksum(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _run_chunk(fn, nets, lrs, sharding, batches=None):
    """Run one chunk of configurations (a hook the resumability test interrupts); `batches`,
    the chunk's mini-batches, is passed only when it has some."""
    if sharding is not None:
        nets, lrs, batches = jax.device_put((nets, lrs, batches), sharding)
    return jax.tree.map(np.asarray, fn(nets, lrs) if batches is None else fn(nets, lrs, batches))


def _atomic_save(directory, stem, arrays, meta) -> None:
    """`stem.npz` then `stem.json` (which marks the chunk finished), each written atomically;
    the JSON holds the npz's SHA-256 and a checksum of itself, so damage is detected."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    meta = {**meta, "npz_sha256": hashlib.sha256(data).hexdigest()}
    meta["checksum"] = _checksum(meta)
    for suffix, payload in ((".npz", data), (".json", json.dumps(meta, indent=1).encode())):
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix + ".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, os.path.join(directory, stem + suffix))


def _damaged(meta_path, why) -> ValueError:
    npz_path = meta_path[: -len(".json")] + ".npz"
    return ValueError(
        f"the sweep chunk {meta_path} (with {os.path.basename(npz_path)}) is damaged: {why}. "
        f"Delete {meta_path} and {npz_path} to recompute that chunk."
    )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_meta(meta_path) -> dict:
    """A file's JSON, checked against its own checksum (`ValueError` naming it if damaged)."""
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode())
        intact = meta.pop("checksum") == _checksum(meta)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise _damaged(meta_path, f"cannot read it ({type(err).__name__}: {err})") from err
    if not intact:
        raise _damaged(meta_path, "its content does not match its checksum")
    return meta


def _read_arrays(meta_path, meta) -> dict:
    """The npz beside `meta_path`, checked against the SHA-256 its JSON holds."""
    npz_path = meta_path[: -len(".json")] + ".npz"
    try:
        with open(npz_path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise _damaged(meta_path, f"cannot read {os.path.basename(npz_path)} "
                                  f"({type(err).__name__}: {err})") from err
    if hashlib.sha256(data).hexdigest() != meta["npz_sha256"]:
        raise _damaged(meta_path, f"{os.path.basename(npz_path)} does not match the "
                                  "checksum in the JSON (truncated or modified)")
    with np.load(io.BytesIO(data)) as z:  # the bytes written: they load
        return {key: z[key] for key in z.files}


def _refuse(directory, meta_path, meta, config) -> ValueError:
    """The error for a chunk `meta_path` of another sweep in `directory`, naming what
    differs."""
    old = meta.get("config", {})
    diff = [f"{k} = {_short(old.get(k))} there, {_short(config.get(k))} now"
            for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
    return ValueError(
        f"`out` = {str(directory)!r} holds chunks of a different sweep ("
        f"{os.path.basename(meta_path)}): "
        + ("; ".join(diff) if diff else "the data `X`, `y` differ")
        + ". Pass another `out` directory, or empty this one to start over."
    )


def _check_directory(directory, fingerprint, config) -> None:
    """Every chunk in `directory` (not only those named like this sweep's: a sweep over
    batch sizes names its chunks by batch size) must be of this sweep."""
    for meta_path in sorted(glob.glob(os.path.join(glob.escape(str(directory)),
                                                   "depth*_configs*.json"))):
        meta = _read_meta(meta_path)
        if meta["fingerprint"] != fingerprint:
            raise _refuse(directory, meta_path, meta, config)


def _load_finished(directory, prefix, fingerprint, config, n):
    """The finished chunks `prefix_configs*.json` in `directory`, as `(indices, arrays)` pairs
    (indices into the `n` configurations of the group). Chunks of another chunking are fine;
    a chunk of another sweep, or a damaged one, raises `ValueError` naming the file."""
    pieces = []
    for meta_path in sorted(glob.glob(os.path.join(glob.escape(str(directory)),
                                                   glob.escape(prefix) + "_configs*.json"))):
        meta = _read_meta(meta_path)
        if meta["fingerprint"] != fingerprint:
            raise _refuse(directory, meta_path, meta, config)
        arrays = _read_arrays(meta_path, meta)
        index = np.asarray(meta["index"], np.int64)
        if index.size == 0 or index.min() < 0 or index.max() >= n or any(
                len(v) != len(index) for v in arrays.values()):
            raise _damaged(meta_path, "its configuration indices do not fit this sweep")
        pieces.append((index, arrays))
    return pieces


def _build_nets(seeds, d, buckets, out_dim, parametrization, dtype):
    """The networks of every bucket `(archs, kws, pad_to)` as NumPy leaves, `(W, S, ...)`:
    `ReLUNet.init(jax.random.key(seed), d, arch, ...)` for every architecture and seed,
    zero-padded to `pad_to` (`pad_network`), bit for bit (see `_build_nets_async`)."""
    return [built() for _, built in _build_nets_async(seeds, d, buckets, out_dim,
                                                      parametrization, dtype)]


def _build_nets_async(seeds, d, buckets, out_dim, parametrization, dtype, pool=None):
    """Per bucket, `(shapes, built)`: the `ShapeDtypeStruct`s of `_build_nets`'s networks,
    known at once, and a function returning the networks. All of them come from one
    compiled program (`vmap_keys`: one threefry draw of one flat shape for every layer),
    kept for an identical sweep, compiled on `pool` (a thread pool) if given; eagerly, each
    of the few random draws per shape would compile on its own, the bulk of a first sweep's
    time."""
    if not buckets:
        return []
    if not flat_random_bits():  # another PRNG: eagerly, per configuration
        out = []
        for archs, kws, pad_to in buckets:
            nets = _build_nets_eagerly(seeds, d, archs, kws, out_dim, parametrization, dtype,
                                       pad_to)
            out.append((jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nets),
                        lambda nets=nets: nets))
        return out
    key = (d, out_dim, parametrization, str(jnp.dtype(dtype)), len(seeds), repr([
        (archs, _describe(list(kws)), pad_to) for archs, kws, pad_to in buckets]))
    if key not in _BUILDERS:
        inits = [(a, kw, pad_to) for archs, kws, pad_to in buckets for a, kw in zip(archs, kws)]
        statics = [None] * len(inits)

        def init(j, k):
            a, kw, pad_to = inits[j]
            net = pad_network(ReLUNet.init(k, d, a, out_dim=out_dim, dtype=dtype,
                                           parametrization=parametrization, **kw), pad_to)
            arrays, statics[j] = eqx.partition(net, eqx.is_array)
            return arrays

        options = _quick_options(jax.devices()[0].platform)  # it runs for milliseconds
        program = jax.jit(lambda key_data: vmap_keys(
            [functools.partial(init, j) for j in range(len(inits))], key_data),
            **({} if options is None else {"compiler_options": options}))
        while len(_BUILDERS) >= 16:
            _BUILDERS.pop(next(iter(_BUILDERS)))
        _BUILDERS[key] = program, statics
    program, statics = _BUILDERS[key]
    key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    traced = program.trace(key_data)  # (a second time: the trace is kept)
    compiled = (pool or _Now()).submit(traced.lower().compile)
    done = []

    def arrays():  # per architecture, (S, ...)
        if not done:
            compiled.result()  # (and kept for this call)
            done.append([jax.tree.map(np.asarray, a) for a in program(key_data)])
        return done[0]

    out, j = [], 0
    for archs, _, _ in buckets:
        js, W = range(j, j + len(archs)), len(archs)
        j += W
        shapes = eqx.combine(jax.tree.map(lambda a, W=W: jax.ShapeDtypeStruct(
            (W, *a.shape), a.dtype), traced.out_info[js[0]]), statics[js[0]])

        def built(js=js):
            parts = [arrays()[i] for i in js]
            return eqx.combine(jax.tree.map(lambda *xs: np.stack(xs), *parts), statics[js[0]])

        out.append((shapes, built))
    return out


def _build_nets_eagerly(seeds, d, archs, kws, out_dim, parametrization, dtype, pad_to):
    """`_build_nets` of one bucket, one `ReLUNet.init` per architecture and seed."""
    nets = [pad_network(ReLUNet.init(jax.random.key(s), d, a, out_dim=out_dim,
                                     parametrization=parametrization, dtype=dtype, **kw), pad_to)
            for a, kw in zip(archs, kws) for s in seeds]
    arrays, static = eqx.partition(nets[0], eqx.is_array)
    leaves = [jax.tree.leaves(eqx.filter(n, eqx.is_array)) for n in nets]
    stacked = [np.stack([np.asarray(x[i]) for x in leaves]).reshape(
        (len(archs), len(seeds)) + np.shape(leaves[0][i])) for i in range(len(leaves[0]))]
    return eqx.combine(jax.tree.unflatten(jax.tree.structure(arrays), stacked), static)


_BUILDERS: dict = {}  # the compiled network builders of recent sweeps, by configuration

#: XLA options for programs that run briefly, per platform: on CPU, XLA's older fusion
#: emitters compile about a third faster, and their code runs about 15% slower (to the same
#: bits: the tests compare the sweep with `ReLUNet.init` and `simulate`).
_QUICK_OPTIONS = {"cpu": {"xla_cpu_use_fusion_emitters": False}}
#: a bucket's program is compiled with them below this many multiply-adds: about half a
#: second on one CPU core (9e10 a second measured), where the compile time they save (0.1 to
#: 0.2 s a program) still outweighs the run time they cost
_QUICK_WORK = 5e10


@functools.cache
def _quick_options(platform: str) -> dict | None:
    """`_QUICK_OPTIONS` of `platform`, if this XLA accepts them (checked once, on a tiny
    program), else None."""
    options = _QUICK_OPTIONS.get(platform)
    if options is None:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options


@functools.cache
def _run_pairs_quick(options: tuple):
    """`run_pairs_jit` compiled with the XLA `options` (`_QUICK_OPTIONS`)."""
    return eqx.filter_jit(run_pairs, compiler_options=dict(options))


def _work(P, d, widths, n_configs, steps, itemsize) -> float:
    """Multiply-adds of `n_configs` runs of `steps` (a step counted as three passes through
    the layers, float64 as twice float32)."""
    sizes = (d, *widths)
    return 3 * P * sum(n * (m + 1) for n, m in zip(sizes[1:], sizes[:-1])) * n_configs \
        * steps * itemsize / 4


def _run_jit(P, d, widths, n_configs, steps, itemsize, platform):
    """The compiled core that runs `n_configs` configurations of `widths` for `steps`:
    `run_pairs_jit`, or its quick-compiling twin below `_QUICK_WORK` multiply-adds."""
    options = _quick_options(platform)
    if options is None or _work(P, d, widths, n_configs, steps, itemsize) > _QUICK_WORK:
        return run_pairs_jit
    return _run_pairs_quick(tuple(sorted(options.items())))


def _run_buckets(groups, X, y, test, *, vmap_sizes, statics):
    """`run_pairs` on several buckets `(nets, lrs, batches)` (each with its `run_pairs`
    keywords in `statics`) in one program (one compilation, the sum of theirs less what each
    program costs on its own)."""
    return tuple(run_pairs(nets, lrs, X, y, batches, test, **static, vmap_size=k)
                 for (nets, lrs, batches), k, static in zip(groups, vmap_sizes, statics))


@functools.cache
def _run_buckets_jit(options: tuple | None):
    """`_run_buckets` compiled (with the XLA `options`, if any), kept."""
    return eqx.filter_jit(_run_buckets, **({} if options is None else {
        "compiler_options": dict(options)}))


class _Bucket:
    """The plan for one width bucket of one depth at one batch size: group `g`, width
    entries `ws`, the networks' `spec` `(archs, structure kwargs, pad_to)`, the batch size
    `B` (`None`: full batch; entry `k` of the batch sizes), `prefix` (its chunk files'
    name), and, once planned, `nets` (a function returning them, `(W, S, ...)`), `chunk`
    (configurations per call), `run` (a chunk's call), `inputs` (zero inputs of a chunk's
    shape, for compiling ahead), `work` (multiply-adds to run) and `nbytes` (the memory
    estimate of a chunk)."""

    def __init__(self, g, ws, spec, k=0, B=None, prefix=None):
        self.g, self.ws, self.spec, self.k, self.B, self.prefix = g, ws, spec, k, B, prefix
        self.id = (g, k)
        self.nets = self.chunk = self.run = self.inputs = None
        self.work = self.nbytes = 0


def _structure_of(d, arch, out_dim, parametrization, dtype, kw):
    """The pytree structure of the networks of one architecture (for grouping)."""
    key = (d, arch, out_dim, parametrization, str(dtype), repr(_describe(kw)))
    if key not in _STRUCTURES:
        _STRUCTURES[key] = jax.tree.structure(jax.eval_shape(lambda: ReLUNet.init(
            jax.random.key(0), d, arch, out_dim=out_dim, parametrization=parametrization,
            dtype=dtype, **kw)))
    return _STRUCTURES[key]


_STRUCTURES: dict = {}


def _progress(total, enabled):
    return progress_bar(total, enabled, desc="sweep chunks", unit="chunk")


def sweep(
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    widths: Sequence,
    depths: Sequence[int],
    seeds: Sequence[int],
    lrs: Sequence[float],
    steps: int,
    engine: AbstractEngine = Weights(),
    parametrization: str = "ntk",
    out_dim: int | None = None,
    observables=None,
    out: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    record_every: int = 1,
    top_m: int = 5,
    reference: AbstractEngine | None = None,
    structure: dict | Callable[[int, tuple[int, ...]], dict] | None = None,
    max_padding: float = 1.0,
    progress: bool = True,
    vmap_size: int | None = None,
    test: tuple | None = None,
    batch_sizes: Sequence[int | None] | None = None,
) -> SweepResult:
    """Gradient descent (`simulate`) over the grid depths × widths × seeds × lrs, and
    optionally mini-batch sizes (`batch_sizes`).

    A driver around one pure core (`run_pairs`, compiled once per static configuration and
    kept, so an identical second call reuses it): seeds and learning rates share one program
    (`jax.vmap`, or in sequence: `vmap_size`); widths too, by exact zero-padding
    (`pad_network`) within buckets of similar widths (`width_buckets`: padding adds at most
    `max_padding` to a bucket's work — the default 1.0 at most doubles it, a fair trade while
    compiling a program costs more than running it; lower it for long runs of very different
    widths), with the scales from the true widths as traced leaves. The networks of every
    bucket come from one compiled program (`vmap_keys`), equal to `ReLUNet.init` per seed.
    On CPU a first call spends more time compiling than running: brief programs (the
    network builder, buckets of less than about half a second of work) are compiled with
    XLA's quicker options (`_QUICK_OPTIONS`, same results), and with an idle core, on it,
    beside the tracing and running (`_compiler_pool`). The configurations of a depth are
    split into chunks that fit `max_bytes` (default: half the accelerator's memory, or a
    quarter of the host's RAM on CPU; buckets in one chunk each, that fit together, share
    one program and one call), run one compiled call per chunk with a progress bar, and,
    with more than one device, sharded over the devices along the configuration axis
    (`jax.sharding.Mesh` + `NamedSharding`). The chunking changes neither the results nor
    what a rerun into the same `out` can reuse.

    **Arguments:**

    - `X` `(P, d)`, `y` `(P,)` or `(P, k)`: the data; networks are `ReLUNet.init(
      jax.random.key(seed), d, arch, out_dim=out_dim, parametrization=...)`.
    - `widths`: entries are an int (every hidden layer that wide) or a tuple of per-layer
      widths (whose length must equal the depth).
    - `depths`: numbers of hidden layers L. `seeds`: ints. `lrs`: step sizes η of
      `W ← W − η ∂L/∂W` on `L = ½ Σ r²`.
    - `steps`, `record_every`, `engine`, `observables`, `top_m`, `reference`: as in
      `simulate` (engines are objects: `Weights()`, `Collective(closure=...)`, ...).
    - `structure`: structured layers for every network — a dict of `ReLUNet.init` keyword
      arguments (`gains`, `skips`, `train`, `masks`), or a function `(d, widths) -> dict`
      for what depends on the architecture (masks). Networks whose static structure differs
      (e.g. masks of different widths) cannot share one vmap: each such group compiles
      separately.
    - `out`: a directory; each finished chunk is written there atomically (npz + JSON with its
      configurations, versions, the sweep's configuration and fingerprint, and checksums) and
      a rerun loads finished chunks instead of recomputing them, whatever their chunking
      (another `max_bytes` or device count), computing only the missing configurations.
      Chunks of a different sweep (other data, grid, structure, ...) raise `ValueError`
      naming what differs; a damaged chunk (truncated or modified file) raises `ValueError`
      naming the files to delete to recompute it — nothing is silently recomputed or reused.
    - `vmap_size`: how many configurations of a chunk run side by side in one `jax.vmap`;
      the groups run one after another in the same program (`jax.lax.map`), 1 meaning
      plain runs in sequence. Default `None`: all of a chunk on accelerators and when
      sharded over several devices (where it is always all); on one CPU device enough to
      make a pass through the layers about 2¹⁹ multiply-adds, since XLA's batched matrix
      products there are slower than plain ones for wide layers (1 for P = 64 and width
      128) and faster for narrow ones. It changes only the summation order, like the device
      count, so a rerun into the same `out` reuses chunks computed with another.

    - `test`: `(X_test, y_test)`, test sites riding along every configuration as in
      `simulate(..., test=)` (never in the loss); `test_loss` and `test_error` join the
      default observables, and `test_output`, `cross_kernel`, `test_alignment` may be
      asked for. The test data are part of the fingerprint of the chunk files in `out`.
    - `batch_sizes`: mini-batch SGD as a grid axis, e.g. `[None, 8, 32]` (`None`: full-batch
      gradient descent, exactly as without the argument; an int B in [1, P]: the loss of
      each step is `½ Σ_{μ∈batch} r_μ²` of B samples, drawn without replacement within an
      epoch). The batches of seed s at batch size B are `batch_schedule(batch_key(s), P, B,
      steps)` with `batch_key(s) = jax.random.fold_in(jax.random.key(s), 0xBA7C4)`
      (`gramflow.batch_key`), so a configuration is
      `simulate(ReLUNet.init(jax.random.key(s), ...), X, y, lr=lr, batch_size=B,
      key=batch_key(s), ...)` — the same batches for every width and learning rate of a
      seed. Each batch size compiles its own program per bucket (the `(steps, B)`
      index arrays have its shape). The result gains the axis `batch_size` after `lr`, also
      for `[None]`; `gradient_noise` (`GradientNoise(B)`, with B = P for full batch: zero
      noise) joins the default observables of engines carrying fields. Default `None`: full
      batch only, and no such axis.

    **Returns:** a `SweepResult` with arrays `(len(depths), len(widths), len(seeds),
    len(lrs), T, ...)` — `(len(depths), len(widths), len(seeds), len(lrs),
    len(batch_sizes), T, ...)` with `batch_sizes`.
    """
    steps = _positive_int("steps", steps)
    record_every = _positive_int("record_every", record_every)
    out_dim = None if out_dim is None else _positive_int("out_dim", out_dim)
    widths, depths, seeds = tuple(widths), tuple(depths), tuple(int(s) for s in seeds)
    arch = _architectures(widths, depths)
    if not seeds:
        raise ValueError("`seeds` must be non-empty.")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; expected one of "
                         f"{PARAMETRIZATIONS}.")
    X, y = check_data(X, y, out_dim=out_dim)
    lr_values = np.asarray(lrs, dtype=np.float64).reshape(-1)
    if lr_values.size == 0 or not np.all(np.isfinite(lr_values)) or np.any(lr_values <= 0):
        raise ValueError(f"`lrs` must be non-empty, positive and finite, got {lrs!r}.")
    engine = _check_engine("engine", engine)
    reference = _check_engine("reference", reference, optional=True)
    if not engine.needs_lr():
        raise ValueError("`sweep` sweeps the step size `lrs` of plain gradient descent; an "
                         "engine with its own optimizer is not supported here.")
    P, d = X.shape
    test = _check_test(test, X, out_dim)
    bsizes = _check_batch_sizes(batch_sizes, P)
    # The observables of each batch size (`gradient_noise`, among the defaults of a sweep
    # over batch sizes, describes batches of that size; of P for full batch: no noise).
    obs_of = [resolve(observables, fields=engine.carries_fields, top_m=top_m,
                      test=test is not None,
                      batch_size=None if batch_sizes is None else (P if B is None else B))
              for B in bsizes]
    obs = obs_of[0]
    if not 0 <= max_padding:
        raise ValueError(f"`max_padding` must be ≥ 0, got {max_padding!r}.")
    vmap_size = None if vmap_size is None else _positive_int("vmap_size", vmap_size)
    budget = _default_max_bytes() if max_bytes is None else int(max_bytes)
    devices = jax.devices()
    n_dev = len(devices)
    sharding = None
    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("configs",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("configs"))
    lr_np = lr_values.astype(X.dtype)
    # NumPy in, `device_put` out: `jnp.asarray` of a host array compiles a program per shape.
    lrs_arr = jax.device_put(lr_np)
    n_sr = len(seeds) * len(lr_values)  # configurations per width
    statics = [dict(steps=steps, engine=engine, record_every=record_every, observables=o,
                    top_m=top_m, reference=reference) for o in obs_of]

    def fn(nets, lrs, batches=None, *, jitted, vmap_size, static):
        return jitted(nets, lrs, X, y, batches, test, **static, vmap_size=vmap_size)

    plans, struct_desc = [], []
    for i, L in enumerate(depths):
        # Networks of one depth: those with equal static structure and similar widths (a
        # bucket) share a program, zero-padded to the bucket's largest widths; one program
        # per bucket and batch size (the batches' shape is part of the program).
        kws, groups = [], {}
        for w, a in enumerate(arch[i]):
            kw = structure_kwargs(structure, d, a)
            struct_desc.append(_describe(kw))
            kws.append(kw)
            # (without a `structure` every width of a depth has one structure)
            groups.setdefault(None if structure is None else _structure_of(
                d, a, out_dim, parametrization, X.dtype, kw), []).append(w)
        parts = []
        for same in groups.values():
            for members, pad_to in width_buckets([arch[i][w] for w in same], d, max_padding):
                ws = [same[m] for m in members]
                parts.append((ws, (tuple(arch[i][w] for w in ws), tuple(kws[w] for w in ws),
                                   pad_to)))
        plans.append([
            _Bucket(g, ws, spec, k, B, f"depth{L}_group{g}" + (
                "" if batch_sizes is None else f"_batch{'full' if B is None else B}"))
            for g, (ws, spec) in enumerate(parts) for k, B in enumerate(bsizes)])
    # What the results depend on (not the chunking): the fingerprint of the chunk files.
    config = dict(widths=[list(a) for row in arch for a in row], depths=[int(L) for L in depths],
                  seeds=list(seeds), lrs=lr_values.tolist(), steps=steps, engine=repr(engine),
                  record_every=record_every, parametrization=parametrization, out_dim=out_dim,
                  observables={k: repr(v) for k, v in obs.items()}, top_m=top_m,
                  reference=repr(reference), dtype=str(X.dtype), structure=struct_desc,
                  max_padding=max_padding)
    if test is not None:  # (only then: the fingerprint of a sweep without them is unchanged)
        config["test"] = [_describe(np.asarray(a)) for a in test]
    if batch_sizes is not None:
        config["batch_sizes"] = list(bsizes)
        config["batch_key"] = f"fold_in(key(seed), {BATCH_KEY})"
    config = json.loads(json.dumps(config))  # as read back from a chunk file
    fingerprint = _fingerprint(X, y, config)  # (the test data: by their digest in config)
    # Per bucket: the finished chunks `(configuration indices, arrays)`, loaded up front,
    # and the indices of the configurations still to run.
    finished, todo = {}, {}
    if out is not None:
        os.makedirs(out, exist_ok=True)
        _check_directory(out, fingerprint, config)
    for i, L in enumerate(depths):
        for b in plans[i]:
            n = len(b.ws) * n_sr
            finished[i, b.id] = [] if out is None else _load_finished(
                out, b.prefix, fingerprint, config, n)
            covered = [index for index, _ in finished[i, b.id]]
            todo[i, b.id] = np.setdiff1d(np.arange(n),
                                         np.concatenate(covered) if covered else [])

    # Only the buckets with configurations left to run need networks and programs; the
    # batch sizes of one width bucket share its networks.
    live = [(i, b) for i in range(len(depths)) for b in plans[i] if len(todo[i, b.id])]
    specs = {}
    for i, b in live:
        specs.setdefault((i, b.g), b.spec)
    schedules = {}  # per batch size: (S, steps, B) int32, from the seeds' batch keys

    def schedule(B):
        if B not in schedules:
            schedules[B] = np.stack([np.asarray(batch_schedule(batch_key(s), P, B, steps))
                                     for s in seeds])
        return schedules[B]

    pool = _compiler_pool(len(live) + 1)
    try:
        built = dict(zip(specs, _build_nets_async(seeds, d, list(specs.values()), out_dim,
                                                  parametrization, X.dtype, pool)))
        for i, b in live:
            shapes, b.nets = built[i, b.g]
            pad_to, static = b.spec[2], statics[b.k]
            one = jax.tree.map(lambda a: np.zeros((1, *a.shape[2:]), a.dtype), shapes)
            one_batches = None if b.B is None else np.zeros((1, steps, b.B), np.int32)
            key = (repr(jax.tree.map(lambda a: (a.shape, a.dtype),
                                     (one, one_batches, X, y, test))),
                   repr(sorted((k, repr(v)) for k, v in static.items())))
            if key not in _COST:  # measured once per program, like its compilation
                _COST[key] = working_bytes(run_pairs, one, lr_np[:1], X, y, one_batches,
                                           test, **static)
            per = _COST[key]
            if per > budget:
                raise ValueError(
                    f"one configuration at depth {depths[i]} (widths {pad_to}"
                    + ("" if b.B is None else f", batch size {b.B}") + f") needs about "
                    f"{per:,} bytes, above max_bytes = {budget:,}; reduce P, the widths, "
                    "or the recorded observables."
                )
            chunk = max(1, min(len(b.ws) * n_sr, budget // per))
            chunk = -(-chunk // n_dev) * n_dev if chunk >= n_dev else n_dev  # whole devices
            k = _vmap_size(P, d, pad_to, devices) if vmap_size is None or n_dev > 1 else vmap_size
            if k < chunk:  # chunks of whole groups of k (no program for a remainder)
                chunk -= chunk % k
            group = None if k >= chunk else k
            jitted = _run_jit(P, d, pad_to, len(todo[i, b.id]), steps, X.dtype.itemsize,
                              devices[0].platform)
            b.chunk, b.nbytes = chunk, chunk * per
            b.run = functools.partial(fn, jitted=jitted, vmap_size=group, static=static)
            b.inputs = (jax.tree.map(lambda a, c=chunk: np.zeros((c, *a.shape[2:]), a.dtype),
                                     shapes), np.zeros(chunk, lr_np.dtype),
                        None if b.B is None else np.zeros((chunk, steps, b.B), np.int32))
            b.work = _work(P, d, pad_to, len(todo[i, b.id]), steps, X.dtype.itemsize)

        # Programs are traced and lowered here, then compiled on other cores if idle
        # (`_compiler_pool`) while this thread goes on; a call finds its program compiled.
        # Buckets run in one chunk each (the usual sweep) share one program: one compilation.
        # Sharded, a program depends on its inputs' placement: compiled at its call.
        ready = {}
        fused = [] if sharding is not None else [
            (i, b) for i, b in live if len(todo[i, b.id]) <= b.chunk]
        if len(fused) < 2 or sum(b.nbytes for _, b in fused) > budget:
            fused = []
        else:
            options = _quick_options(devices[0].platform)
            if options is not None and sum(b.work for _, b in fused) > _QUICK_WORK * len(fused):
                options = None
            jitted = _run_buckets_jit(None if options is None else tuple(sorted(options.items())))
            sizes = tuple(b.run.keywords["vmap_size"] for _, b in fused)
            fused_statics = tuple(b.run.keywords["static"] for _, b in fused)

            def run_fused(nets, lrs, batches=None, jitted=jitted, sizes=sizes,
                          fused_statics=fused_statics):
                batches = (None,) * len(nets) if batches is None else batches
                return jitted(tuple(zip(nets, lrs, batches)), X, y, test, vmap_sizes=sizes,
                              statics=fused_statics)

            lowered = jitted.lower(tuple(b.inputs for _, b in fused), X, y, test,
                                   vmap_sizes=sizes, statics=fused_statics)
            ready["fused"] = pool.submit(lowered.compile)
        for i, b in live:
            if sharding is None and not any(b is c for _, c in fused):
                kw = b.run.keywords
                lowered = kw["jitted"].lower(*b.inputs[:2], X, y, b.inputs[2], test,
                                             **kw["static"], vmap_size=kw["vmap_size"])
                ready[i, b.id] = pool.submit(lowered.compile)

        bar = _progress(sum(-(-len(todo[i, b.id]) // b.chunk) for i, b in live), progress)
        stacked = {}

        def gather(i, b, index):  # the configurations `index` of a chunk, filled up to it
            if (i, b.g) not in stacked:
                stacked[i, b.g] = b.nets()  # (W, S, ...), shared by the batch sizes
            idx = np.stack(np.unravel_index(index, (len(b.ws), len(seeds), len(lr_values))),
                           axis=1)
            fill = np.concatenate([idx, np.repeat(idx[-1:], b.chunk - len(idx), 0)])
            # Gathered in NumPy: an eager gather would compile once per leaf shape.
            nets = jax.tree.map(lambda a: a[fill[:, 0], fill[:, 1]], stacked[i, b.g])
            batches = None if b.B is None else schedule(b.B)[fill[:, 1]]
            return idx, nets, lr_np[fill[:, 2]], batches

        def run_chunk(fn, nets, lrs, batches):  # (the hook sees no batches in full batch)
            if batches is None or all(x is None for x in batches):
                return _run_chunk(fn, nets, lrs, sharding)
            return _run_chunk(fn, nets, lrs, sharding, batches)

        results = {}
        if fused:  # one call (through the hook that runs a chunk) for all of them
            gathered = [gather(i, b, todo[i, b.id]) for i, b in fused]
            ready["fused"].result()
            outs = run_chunk(run_fused, *(tuple(g[j] for g in gathered) for j in (1, 2, 3)))
            results = {(i, b.id): out for (i, b), out in zip(fused, outs)}
        per_depth = []
        for i, L in enumerate(depths):
            by_group = {}  # width group -> per batch size, {key: (W_g, S, R, ...)}
            for b in plans[i]:
                ws, n, bid = b.ws, len(b.ws) * n_sr, b.id
                pieces, chunk = finished[i, bid], max(1, len(todo[i, bid]))
                if len(todo[i, bid]) and (i, bid) not in results:
                    chunk = b.chunk
                    if (i, bid) in ready:
                        ready[i, bid].result()  # compiled (or raises what compiling raised)
                for start in range(0, len(todo[i, bid]), chunk):
                    index = todo[i, bid][start:start + chunk]
                    if (i, bid) in results:
                        idx, done = np.stack(np.unravel_index(index, (
                            len(ws), len(seeds), len(lr_values))), axis=1), results[i, bid]
                    else:
                        idx, nets, lrs_chunk, batches = gather(i, b, index)
                        done = run_chunk(b.run, nets, lrs_chunk, batches)
                    done = {key: v[: len(idx)] for key, v in done.items()}
                    if out is not None:
                        extra = {} if batch_sizes is None else {"batch_size": b.B}
                        meta = dict(
                            fingerprint=fingerprint, depth=int(L), group=b.g,
                            index=index.tolist(),
                            configs=[dict(width=list(arch[i][ws[w]]), seed=seeds[s],
                                          lr=float(lr_values[r]), **extra) for w, s, r in idx],
                            config=config, gramflow=__version__, jax=jax.__version__,
                            **extra,
                        )
                        _atomic_save(out, f"{b.prefix}_configs{index[0]:05d}", done, meta)
                    pieces.append((index, done))
                    bar.update(1)
                arrays = by_group.setdefault(b.g, (ws, [None] * len(bsizes)))[1]
                arrays[b.k] = {}
                for key, first in pieces[0][1].items():
                    v = np.empty((n,) + first.shape[1:], first.dtype)
                    for index, done in pieces:
                        v[index] = done[key]
                    arrays[b.k][key] = v.reshape((len(ws), len(seeds), len(lr_values))
                                                 + v.shape[1:])
            merged = {}
            for ws, arrays in by_group.values():
                for key in arrays[0]:
                    v = arrays[0][key] if batch_sizes is None else np.stack(
                        [a[key] for a in arrays], axis=3)  # (W_g, S, R, batch size, ...)
                    merged.setdefault(key, []).append((ws, v))
            per_depth.append({key: _assemble(parts, len(widths))
                              for key, parts in merged.items()})
        bar.close()
    finally:  # what is still compiling is not needed any more (an error, an interruption)
        pool.shutdown(wait=False, cancel_futures=True)

    def stack(key):  # over depths, each observable's shape from what it returned
        return jax.device_put(_assemble([([i], a[None]) for i, a in
                                      enumerate(d[key] for d in per_depth)], len(depths)))

    grid_dims = GRID_DIMS + (() if batch_sizes is None else ("batch_size",))
    keys = [key for key in per_depth[0] if key not in ("loss", "first_nonfinite", "step")]
    dims = {key: grid_dims + ("record",) * (key != "first_nonfinite") + dims_of(
        key, obs.get(key),
        per_depth[0][key].ndim - len(grid_dims) + 1 - (key != "first_nonfinite"))
        for key in ("loss", "first_nonfinite", *keys)}
    step = per_depth[0]["step"]
    result = SweepResult(
        loss=stack("loss"),
        observables={key: stack(key) for key in keys},
        first_nonfinite=stack("first_nonfinite"),
        step=jax.device_put(step.reshape(-1, step.shape[-1])[0]),
        lrs=lrs_arr,
        depths=depths,
        widths=widths,
        seeds=seeds,
        arch=tuple(tuple(row) for row in arch),
        batch_sizes=None if batch_sizes is None else bsizes,
        dims=dims,
    )
    if out is not None:
        result.save(out, dict(fingerprint=fingerprint, config=config, gramflow=__version__,
                              jax=jax.__version__, dtype=str(X.dtype)))
    return result


def _assemble(parts, n: int) -> np.ndarray:
    """Place `(indices, array)` parts along a new first axis of length `n`; arrays whose
    trailing shapes differ (per-layer observables of other depths, per-unit ones of other
    widths) are padded with NaN to the largest."""
    shape = tuple(max(a.shape[j] for _, a in parts) for j in range(1, parts[0][1].ndim))
    dtype = parts[0][1].dtype
    ragged = any(a.shape[1:] != shape for _, a in parts)
    if ragged and not np.issubdtype(dtype, np.floating):
        dtype = np.float64
    out = np.full((n, *shape), np.nan if ragged else 0, dtype)
    for index, a in parts:
        out[(np.asarray(index),) + tuple(slice(0, m) for m in a.shape[1:])] = a
    return out

