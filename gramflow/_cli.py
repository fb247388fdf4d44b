"""The `gramflow` command line (also `python -m gramflow`).

Subcommands: `demo` (the main job), `verify`, `simulate`, `sweep`. `simulate` and `sweep` take
their configuration from flags or a TOML file (`--config run.toml`, keys named as the flags
with `_` for `-`); flags given on the command line win over the file.
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
    from . import _demo as demo
    from ._plots import demo_figures

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
    from .diagnostics import default_structures

    if name not in STRUCTURES:
        raise ValueError(f"unknown structure {name!r}; expected one of {STRUCTURES}.")
    fn = default_structures()[name]
    return (lambda d, widths: {}) if fn is None else fn


def _structure_argument(parser, default=None):
    parser.add_argument("--structure", default=default, choices=STRUCTURES,
                        help="structured layers: 4 block-diagonal pathways, skip paths + gains, "
                             "or both (gramflow.diagnostics.default_structures)")


def _load_toml(path):
    if path is None:
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def _merge(args, defaults: dict) -> dict:
    """defaults ← TOML file ← flags given on the command line."""
    config = dict(defaults)
    file = _load_toml(getattr(args, "config", None))
    unknown = set(file) - set(defaults)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {args.config}; "
                         f"known: {sorted(defaults)}")
    config.update(file)
    config.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    return config


SIMULATE_DEFAULTS = dict(data="teacher", samples=64, depth=2, width=128, parametrization="ntk",
                         steps=500, lr=None, engine="collective", reference="weights",
                         record_every=10, seed=0, out="gramflow-simulate", structure="plain")


def _simulate(args) -> int:
    _x64("float64")
    import jax
    import numpy as np

    import gramflow as gf

    from . import _demo as demo

    c = _merge(args, SIMULATE_DEFAULTS)
    X, y = demo.dataset(c["data"], c["samples"], seed=c["seed"])
    widths = (c["width"],) * c["depth"]
    net = gf.ReLUNet.init(jax.random.key(c["seed"] + 1), X.shape[1], widths,
                          parametrization=c["parametrization"],
                          **_structure(c["structure"])(X.shape[1], widths))
    if c["lr"] is not None:
        lr = c["lr"]
    elif c["structure"] == "plain":
        lr = demo.stable_lr(X, (c["depth"],), (c["width"],))
    else:  # gains put an outlier into K: take the step from this network's own kernel
        lr = 0.5 / float(np.linalg.eigvalsh(np.asarray(gf.collective_kernel(net, X)))[-1])
    reference = None if c["reference"] in (None, "none", c["engine"]) else c["reference"]
    traj = gf.simulate(net, X, y, steps=c["steps"], lr=lr, engine=c["engine"],
                       record_every=c["record_every"], reference=reference)
    out = os.path.abspath(c["out"])
    os.makedirs(out, exist_ok=True)
    arrays = {"loss": np.asarray(traj.loss), "step": np.asarray(traj.step)}
    if traj.r is not None:
        arrays["r"] = np.asarray(traj.r)
    arrays.update({k: np.asarray(v) for k, v in traj.observables.items()})
    np.savez(os.path.join(out, "results.npz"), **arrays)
    summary = dict(config={**c, "lr": lr}, loss_start=float(traj.loss[0]),
                   loss_end=float(traj.loss[-1]), first_nonfinite=int(traj.first_nonfinite))
    if "closure_error" in traj.observables:
        summary["closure_error_max"] = float(np.max(traj.observables["closure_error"]))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    if _figures_available():
        from ._plots import trajectory_figure

        trajectory_figure(out, traj, f"{c['data']}, L = {c['depth']}, width {c['width']}, "
                                     f"{c['engine']}")
    print(f"wrote results to {out}")
    return 0


SWEEP_DEFAULTS = dict(data="teacher", samples=64, depths=[1, 2], widths=[32, 128],
                      seeds=[0, 1], lrs=[0.05, 0.1], steps=200, engine="weights",
                      parametrization="ntk", record_every=10, out="gramflow-sweep",
                      max_bytes=None, structure="plain")


def _sweep(args) -> int:
    _x64("float64")
    import numpy as np

    import gramflow as gf

    from . import _demo as demo

    c = _merge(args, SWEEP_DEFAULTS)
    X, y = demo.dataset(c["data"], c["samples"])
    out = os.path.abspath(c["out"])
    res = gf.sweep(X, y, widths=c["widths"], depths=c["depths"], seeds=c["seeds"],
                   lrs=c["lrs"], steps=c["steps"], engine=c["engine"],
                   parametrization=c["parametrization"], record_every=c["record_every"],
                   out=os.path.join(out, "chunks"), max_bytes=c["max_bytes"],
                   structure=None if c["structure"] == "plain" else _structure(c["structure"]))
    arrays = {"loss": np.asarray(res.loss), "step": np.asarray(res.step),
              "first_nonfinite": np.asarray(res.first_nonfinite)}
    arrays.update({k: np.asarray(v) for k, v in res.observables.items()})
    np.savez(os.path.join(out, "results.npz"), **arrays)
    final = np.asarray(res.loss)[..., -1].mean(axis=2)
    print("final loss (mean over seeds):")
    for i, L in enumerate(res.depths):
        for j, w in enumerate(res.widths):
            cells = "  ".join(f"lr {lr:g}: {final[i, j, r]:.3e}"
                              for r, lr in enumerate(np.asarray(res.lrs)))
            print(f"  L = {L}, width {w}: {cells}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=c, final_loss=final.tolist(),
                       shape="(depth, width, seed, lr, T)"), f, indent=1)
    if _figures_available():
        from ._plots import sweep_figure

        sweep_figure(out, res)
    print(f"wrote results to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gramflow",
        description="Gradient descent as a collective dynamics of fields on the training set.",
    )
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
    s.add_argument("--config", help="TOML file with any of the keys below")
    s.add_argument("--data", choices=["teacher", "digits"])
    s.add_argument("--samples", type=int)
    s.add_argument("--depth", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--parametrization", choices=["standard", "ntk", "mean_field"])
    s.add_argument("--steps", type=int)
    s.add_argument("--lr", type=float, help="default: 0.5 / λ_max(K₀)")
    s.add_argument("--engine", choices=["weights", "collective", "frozen_kernel"])
    s.add_argument("--reference", choices=["weights", "collective", "frozen_kernel", "none"])
    s.add_argument("--record-every", dest="record_every", type=int)
    s.add_argument("--seed", type=int)
    _structure_argument(s)
    s.add_argument("--out")

    w = sub.add_parser("sweep", help="a grid of runs; flags or --config TOML",
                       description="depths × widths × seeds × lrs in a few compiled programs; "
                       "resumable (chunks under OUT/chunks). Defaults: "
                       + ", ".join(f"{k}={v}" for k, v in SWEEP_DEFAULTS.items()))
    w.add_argument("--config", help="TOML file with any of the keys below")
    w.add_argument("--data", choices=["teacher", "digits"])
    w.add_argument("--samples", type=int)
    w.add_argument("--depths", type=int, nargs="+")
    w.add_argument("--widths", type=int, nargs="+")
    w.add_argument("--seeds", type=int, nargs="+")
    w.add_argument("--lrs", type=float, nargs="+")
    w.add_argument("--steps", type=int)
    w.add_argument("--engine", choices=["weights", "collective", "frozen_kernel"])
    w.add_argument("--parametrization", choices=["standard", "ntk", "mean_field"])
    w.add_argument("--record-every", dest="record_every", type=int)
    w.add_argument("--max-bytes", dest="max_bytes", type=int)
    _structure_argument(w)
    w.add_argument("--out")

    args = parser.parse_args(argv)
    commands = {"verify": _verify, "demo": _demo, "simulate": _simulate, "sweep": _sweep}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"gramflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
