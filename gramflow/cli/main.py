"""The `gramflow` command line (also `python -m gramflow`).

Subcommands: `demo` (the main job), `verify`, `simulate`, `sweep`. `simulate` and `sweep` take
their configuration from flags or a TOML file (`--config run.toml`, keys named as the flags
with `_` for `-`, checked as the flags are; a key that takes several values also takes one);
flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _x64(dtype: str) -> None:
    import jax

    if dtype == "float64":
        # A command-line program is its own top-level script: it may choose the precision.
        jax.config.update("jax_enable_x64", True)


def _verify(args) -> int:
    _x64(args.dtype)
    import jax
    import jax.numpy as jnp

    import gramflow as gf

    dtype = jnp.dtype(args.dtype)
    kdata, knet = jax.random.split(jax.random.key(args.seed))
    X, y = gf.teacher_student(
        kdata, samples=args.samples, in_dim=args.in_dim, out_dim=args.out_dim, dtype=dtype
    )
    net = gf.ReLUNet.init(knet, args.in_dim, args.widths, out_dim=args.out_dim,
                          parametrization=args.parametrization, dtype=dtype,
                          **_structure(args.structure)(args.in_dim, tuple(args.widths)))
    report = gf.verify(net, X, y)
    out = "scalar" if args.out_dim is None else f"k = {args.out_dim}"
    print(
        f"teacher–student task: P = {args.samples}, d = {args.in_dim}, output {out}; "
        f"student widths {tuple(args.widths)} ({args.parametrization}, {args.structure}), "
        f"seed {args.seed}"
    )
    print(report)
    return 0 if report.ok(args.rtol) else 1


def _figures_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _demo(args) -> int:
    _x64("float64")
    from ..studies.plots import demo_figures
    from . import demo as demo

    cfg = dict(demo.SIZES[args.size])
    names = ["teacher", "digits"] if args.data == "both" else [args.data]
    if "digits" in names:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print(f"gramflow demo: the digits data need scikit-learn, which is not installed; "
                  f"running on the teacher–student task only. To add it: {demo.EXAMPLES_HINT}")
            names = [n for n in names if n != "digits"]
            if not names:
                names = ["teacher"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"gramflow demo ({args.size}): depths {cfg['depths']} (hidden layers), widths "
          f"{cfg['widths']}, {cfg['steps']} steps of gradient descent on ½ Σ r², float64")
    results = []
    for name in names:
        X, y = demo.dataset(name, cfg[name], seed=args.seed)
        print(f"\n[{name}] P = {X.shape[0]}, d = {X.shape[1]}: exact collective engine beside "
              "the weights, then the closures")
        results.append(demo.run_dataset(name, X, y, cfg, progress=not args.quiet))
    rows = [row for r in results for row in demo.summary_rows(r)]
    print("\nsummary (final step; 'exact err' = collective engine vs weights; closure columns = "
          "‖r − r_exact‖/‖r_exact‖):")
    print(demo.format_table(rows))
    figures = []
    if _figures_available():
        for r in results:
            figures += demo_figures(out, r)
        figures.append(demo.limit_figure(out, results))
    else:
        print(f"\n(no figures: matplotlib is not installed; {demo.EXAMPLES_HINT})")
    results_path = demo.save_results(out, results, rows, cfg)
    print(f"\nwrote {len(figures)} figures and results (results.npz, results.json) to {out}")
    for path in figures:
        print("  ", os.path.basename(path))
    print(f"done in {time.perf_counter() - t0:.0f} s; results: {results_path}")
    return 0


STRUCTURES = ("plain", "pathways", "corrected", "both")


def _structure(name):
    """`(d, widths) -> ReLUNet.init keyword arguments` for a named structure
    (`gramflow.diagnostics.default_structures`)."""
    from ..diagnostics import default_structures

    if name not in STRUCTURES:
        raise ValueError(f"unknown structure {name!r}; expected one of {STRUCTURES}.")
    fn = default_structures()[name]
    return (lambda d, widths: {}) if fn is None else fn


STRUCTURE_OPTION = dict(choices=STRUCTURES, help="structured layers: 4 block-diagonal "
                        "pathways, skip paths + gains, or both "
                        "(gramflow.diagnostics.default_structures)")


def _structure_argument(parser, default=None):
    parser.add_argument("--structure", default=default, **STRUCTURE_OPTION)


def _load_toml(path):
    if path is None:
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read config {path}: {err}; fix the TOML there.") from err


def _batch_size(text):
    """A `--batch-sizes` entry: a positive int, or `full` for full-batch gradient descent."""
    if text in ("full", None):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor 'full'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"batch sizes are positive, got {value}")
    return value


def _is(value, kind) -> bool:
    if isinstance(value, bool):
        return False
    if kind is _batch_size:
        return value == "full" or (isinstance(value, int) and value > 0)
    return isinstance(value, {int: int, float: (int, float)}.get(kind, str))


def _toml_value(path, key, value, option: dict):
    """`value` of `key` in the TOML file `path`, checked as its flag (`option`: the
    `add_argument` keywords) would check it; a key with `nargs="+"` also takes one value."""
    many = option.get("nargs") == "+"
    kind = option.get("type", str)
    if isinstance(value, list) and not many:
        raise ValueError(f"`{key}` in {path} takes one value, got the list {value!r}; write "
                         f"e.g. `{key} = {_literal(value[0]) if value else '...'}`.")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"`{key}` in {path} is an empty list; give at least one value.")
    for v in items:
        per_layer = key == "widths" and isinstance(v, list) and v and all(_is(n, int) for n in v)
        if not (_is(v, kind) or per_layer):
            what = {int: "an int", float: "a number",
                    _batch_size: 'a positive int or "full"'}.get(kind, "a string")
            raise ValueError(
                f"`{key}` in {path} must be {what}{' or a list of them' if many else ''}, "
                f"got {value!r}."
            )
        if "choices" in option and v not in option["choices"]:
            raise ValueError(f"`{key}` in {path} is {v!r}; choose from "
                             f"{list(option['choices'])}.")
    return items if many else value


def _literal(value) -> str:
    """`value` as written in TOML."""
    return json.dumps(value)


def _merge(args, defaults: dict, options: dict) -> dict:
    """defaults ← TOML file ← flags given on the command line."""
    config = dict(defaults)
    path = getattr(args, "config", None)
    file = _load_toml(path)
    unknown = set(file) - set(defaults)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {path}; "
                         f"known: {sorted(defaults)}")
    config.update({k: _toml_value(path, k, v, options[k]) for k, v in file.items()})
    config.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    return config


def _add_options(parser, options: dict) -> None:
    """`--config`, then one flag per key of `options`: `--record-every` for `record_every`."""
    parser.add_argument("--config", help="TOML file with any of the keys below (`_` for `-`)")
    for key, kw in options.items():
        parser.add_argument("--" + key.replace("_", "-"), dest=key, **kw)


def _data(c):
    """The data set of a configuration, in its `dtype`: a built-in one (`data` in `DATA`,
    `samples` of them, default 64, drawn with `seed`), or a `.npz` file / directory of `.npy`
    files (`gramflow.load_data`; the first `samples` rows if given)."""
    import jax.numpy as jnp

    from ..studies.data import load_data
    from . import demo as demo

    if c["data"] in DATA:
        X, y = demo.dataset(c["data"], c["samples"] or 64, seed=c.get("seed", 0))
        return X.astype(c["dtype"]), y.astype(c["dtype"])
    if not os.path.exists(c["data"]):
        raise ValueError(f"`--data` must be one of {DATA} or the path of a .npz file or a "
                         f"directory of X.npy, y.npy; no such file: {c['data']}")
    X, y = load_data(c["data"])
    if c["samples"] is not None:
        if c["samples"] > X.shape[0]:
            raise ValueError(f"`--samples` = {c['samples']} exceeds the {X.shape[0]} rows of "
                             f"{c['data']}.")
        X, y = X[: c["samples"]], y[: c["samples"]]
    return jnp.asarray(X, c["dtype"]), jnp.asarray(y, c["dtype"])


DATA_OPTION = dict(help="'teacher' (seeded teacher–student task), 'digits' (scikit-learn's "
                   "bundled digits) or your own data: a .npz file with arrays X and y, or a "
                   "directory holding X.npy and y.npy (memory-mapped)")
SAMPLES_OPTION = dict(type=int, help="number of samples P (built-in data: default 64; a file: "
                      "its first P rows, default all)")


DTYPES = ("float64", "float32")
ENGINES = ("weights", "collective", "frozen_kernel")
DATA = ("teacher", "digits")


def _engine(name):
    """The engine object of a command-line engine name (`ENGINES`)."""
    from ..dynamics.engines import Collective, FrozenKernel, Weights

    return {"weights": Weights, "collective": Collective, "frozen_kernel": FrozenKernel}[name]()


def _common_options():
    from ..dynamics.observables import OBSERVABLES

    return dict(
        structure=STRUCTURE_OPTION,
        dtype=dict(choices=DTYPES, help="float32 runs without enabling 64-bit JAX"),
        observables=dict(nargs="+", choices=tuple(OBSERVABLES), metavar="NAME",
                         help="what to record, from gramflow.OBSERVABLES: "
                              + ", ".join(OBSERVABLES) + " (default: the cheap ones)"),
        out=dict(help="output folder"),
    )


def _simulate_options():
    from ..model.network import PARAMETRIZATIONS

    return dict(
        data=DATA_OPTION,
        samples=SAMPLES_OPTION,
        depth=dict(type=int),
        width=dict(type=int),
        parametrization=dict(choices=PARAMETRIZATIONS),
        steps=dict(type=int),
        lr=dict(type=float, help="default: 0.5 / λ_max(K₀)"),
        engine=dict(choices=ENGINES),
        reference=dict(choices=(*ENGINES, "none")),
        record_every=dict(type=int),
        seed=dict(type=int),
        batch_size=dict(type=int, help="mini-batch SGD with batches of this size, drawn from "
                        "the seed (default: full-batch gradient descent)"),
        **_common_options(),
    )


def _sweep_options():
    from ..model.network import PARAMETRIZATIONS

    return dict(
        data=DATA_OPTION,
        samples=SAMPLES_OPTION,
        depths=dict(type=int, nargs="+"),
        widths=dict(type=int, nargs="+"),
        seeds=dict(type=int, nargs="+"),
        lrs=dict(type=float, nargs="+"),
        steps=dict(type=int),
        engine=dict(choices=ENGINES),
        parametrization=dict(choices=PARAMETRIZATIONS),
        record_every=dict(type=int),
        max_bytes=dict(type=int),
        batch_sizes=dict(type=_batch_size, nargs="+", metavar="B",
                         help="mini-batch sizes as a grid axis, 'full' for full batch (the "
                              "batches of seed s are drawn from gramflow.batch_key(s))"),
        **_common_options(),
    )


SIMULATE_DEFAULTS = dict(data="teacher", samples=None, depth=2, width=128,
                         parametrization="ntk", steps=500, lr=None, engine="collective",
                         reference="weights", record_every=10, seed=0, out="gramflow-simulate",
                         structure="plain", dtype="float64", observables=None, batch_size=None)



def _simulate(args) -> int:
    c = _merge(args, SIMULATE_DEFAULTS, _simulate_options())
    _x64(c["dtype"])
    import jax
    import numpy as np

    import gramflow as gf

    from . import demo as demo

    X, y = _data(c)
    widths = (c["width"],) * c["depth"]
    net = gf.ReLUNet.init(jax.random.key(c["seed"] + 1), X.shape[1], widths,
                          parametrization=c["parametrization"], dtype=X.dtype,
                          **_structure(c["structure"])(X.shape[1], widths))
    if c["lr"] is not None:
        lr = c["lr"]
    elif c["structure"] == "plain":
        lr = demo.stable_lr(X, (c["depth"],), (c["width"],))
    else:  # gains put an outlier into K: take the step from this network's own kernel
        lr = 0.5 / float(np.linalg.eigvalsh(np.asarray(gf.collective_kernel(net, X)))[-1])
    reference = (None if c["reference"] in (None, "none", c["engine"])
                 else _engine(c["reference"]))
    sgd = {} if c["batch_size"] is None else dict(batch_size=c["batch_size"],
                                                  key=gf.batch_key(c["seed"]))
    traj = gf.simulate(net, X, y, steps=c["steps"], lr=lr, engine=_engine(c["engine"]),
                       record_every=c["record_every"], reference=reference,
                       observables=c["observables"], **sgd)
    out = os.path.abspath(c["out"])
    os.makedirs(out, exist_ok=True)
    arrays = {"loss": np.asarray(traj.loss), "step": np.asarray(traj.step)}
    if traj.r is not None:
        arrays["r"] = np.asarray(traj.r)
    arrays.update({k: np.asarray(v) for k, v in traj.observables.items()})
    np.savez(os.path.join(out, "results.npz"), **arrays)
    summary = dict(config={**c, "lr": lr}, loss_start=float(traj.loss[0]),
                   loss_end=float(traj.loss[-1]), first_nonfinite=int(traj.first_nonfinite),
                   **_provenance(X, _simulate_dims(arrays, c, traj.engine)))
    if "closure_error" in traj.observables:
        summary["closure_error_max"] = float(np.max(traj.observables["closure_error"]))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    if _figures_available():
        from ..studies.plots import trajectory_figure

        name = os.path.basename(str(c["data"]))
        trajectory_figure(out, traj, f"{name}, L = {c['depth']}, width {c['width']}, "
                                     f"{c['engine']}")
    print(f"wrote results to {out}")
    return 0


def _provenance(X, dims) -> dict:
    """What every results file records beside the configuration: versions, dtype, the
    dimension names of each array."""
    from .._version import versions

    return dict(versions=versions(), dtype=str(X.dtype), dims=dims)


def _simulate_dims(arrays, c, engine) -> dict:
    from ..dynamics.observables import dims_of, resolve

    objs = resolve(c["observables"], fields=engine.carries_fields, top_m=5,
                   batch_size=c.get("batch_size"))
    dims = {"loss": ["record"], "step": ["record"]}
    for name, value in arrays.items():
        if name not in dims:
            dims[name] = ["record", *dims_of(name, objs.get(name), value.ndim - 1)]
    return dims


SWEEP_DEFAULTS = dict(data="teacher", samples=None, depths=[1, 2], widths=[32, 128],
                      seeds=[0, 1], lrs=[0.05, 0.1], steps=200, engine="weights",
                      parametrization="ntk", record_every=10, out="gramflow-sweep",
                      max_bytes=None, structure="plain", dtype="float64", observables=None,
                      batch_sizes=None)


def _sweep(args) -> int:
    c = _merge(args, SWEEP_DEFAULTS, _sweep_options())
    _x64(c["dtype"])
    import numpy as np

    import gramflow as gf

    X, y = _data(c)
    out = os.path.abspath(c["out"])
    res = gf.sweep(X, y, widths=c["widths"], depths=c["depths"], seeds=c["seeds"],
                   lrs=c["lrs"], steps=c["steps"], engine=_engine(c["engine"]),
                   parametrization=c["parametrization"], record_every=c["record_every"],
                   out=os.path.join(out, "chunks"), max_bytes=c["max_bytes"],
                   observables=c["observables"],
                   structure=None if c["structure"] == "plain" else _structure(c["structure"]),
                   batch_sizes=None if c["batch_sizes"] is None
                   else [_batch_size(b) for b in c["batch_sizes"]])
    arrays = {"loss": np.asarray(res.loss), "step": np.asarray(res.step),
              "first_nonfinite": np.asarray(res.first_nonfinite)}
    arrays.update({k: np.asarray(v) for k, v in res.observables.items()})
    np.savez(os.path.join(out, "results.npz"), **arrays)
    final = np.asarray(res.loss)[..., -1].mean(axis=2)  # (depth, width, lr[, batch size])
    if res.batch_sizes is None:
        cell, names = final[..., None], [""]
    else:
        cell, names = final, [f", B {'full' if B is None else B}" for B in res.batch_sizes]
    print("final loss (mean over seeds):")
    for i, L in enumerate(res.depths):
        for j, w in enumerate(res.widths):
            cells = "  ".join(
                f"lr {lr:g}{name}: {cell[i, j, r, b]:.3e}"
                for r, lr in enumerate(np.asarray(res.lrs)) for b, name in enumerate(names))
            print(f"  L = {L}, width {w}: {cells}")
    with open(os.path.join(out, "results.json"), "w") as f:
        dims = {"step": ["record"], **{k: list(v) for k, v in res.dims.items()}}
        final_dims = [d for d in dims["loss"] if d not in ("seed", "record")]
        json.dump(dict(config=c, final_loss=final.tolist(), final_loss_dims=final_dims,
                       **_provenance(X, dims)), f, indent=1)
    if _figures_available():
        from ..studies.plots import sweep_figure

        sweep_figure(out, res)
    print(f"wrote results to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="gramflow",
        description="Gradient descent as a collective dynamics of fields on the training set.",
    )
    parser.add_argument("--version", action="version", version=f"gramflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: train, compare closures, write figures",
                       description="Train fixed-readout ReLU networks of depth 1–3 over a few "
                       "widths on built-in data, run the exact collective engine and the "
                       "truncated closures, print a summary and write figures and results.")
    d.add_argument("--out", default="gramflow-demo", help="output folder (default ./gramflow-demo)")
    d.add_argument("--size", default="small", choices=["tiny", "small", "large"],
                   help="small (default, ~1 min on 2 cores) or large (a real run)")
    d.add_argument("--data", default="both", choices=["teacher", "digits", "both"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    v = sub.add_parser(
        "verify",
        help="check fields, gradients and kernels against autodiff on a built-in task",
        description="Build a network on the seeded teacher–student task and print the "
        "verification table (gramflow.verify). Exits 1 if an error exceeds the tolerance.",
    )
    v.add_argument("--widths", type=int, nargs="+", default=[32, 24, 16], help="hidden widths")
    v.add_argument("--samples", type=int, default=48, help="number of samples P")
    v.add_argument("--in-dim", type=int, default=8, help="input dimension d")
    v.add_argument("--out-dim", type=int, default=None, help="output dimension k (default: scalar)")
    v.add_argument("--parametrization", default="ntk", choices=["standard", "ntk", "mean_field"])
    v.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    v.add_argument("--rtol", type=float, default=None, help="tolerance (default by dtype)")
    v.add_argument("--seed", type=int, default=0)
    _structure_argument(v, default="plain")

    s = sub.add_parser("simulate", help="one training run; flags or --config TOML",
                       description="Gradient descent on one network; writes results.npz, "
                       "results.json and loss_curve.png. Defaults: "
                       + ", ".join(f"{k}={v}" for k, v in SIMULATE_DEFAULTS.items()))
    _add_options(s, _simulate_options())

    w = sub.add_parser("sweep", help="a grid of runs; flags or --config TOML",
                       description="depths × widths × seeds × lrs in a few compiled programs; "
                       "resumable (chunks under OUT/chunks). Defaults: "
                       + ", ".join(f"{k}={v}" for k, v in SWEEP_DEFAULTS.items()))
    _add_options(w, _sweep_options())

    args = parser.parse_args(argv)
    commands = {"verify": _verify, "demo": _demo, "simulate": _simulate, "sweep": _sweep}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"gramflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
