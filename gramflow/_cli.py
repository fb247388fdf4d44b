"""The `gramflow` command line (also `python -m gramflow`)."""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    import jax

    if args.dtype == "float64":
        # A command-line program is its own top-level script: it may choose the precision.
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import gramflow as gf

    dtype = jnp.dtype(args.dtype)
    kdata, knet = jax.random.split(jax.random.key(args.seed))
    X, y = gf.teacher_student(
        kdata, samples=args.samples, in_dim=args.in_dim, out_dim=args.out_dim, dtype=dtype
    )
    net = gf.ReLUNet.init(
        knet,
        args.in_dim,
        args.widths,
        out_dim=args.out_dim,
        parametrization=args.parametrization,
        dtype=dtype,
    )
    report = gf.verify(net, X, y)
    out = "scalar" if args.out_dim is None else f"k = {args.out_dim}"
    print(
        f"teacher–student task: P = {args.samples}, d = {args.in_dim}, output {out}; "
        f"student widths {tuple(args.widths)} ({args.parametrization}), seed {args.seed}"
    )
    print(report)
    return 0 if report.ok(args.rtol) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gramflow",
        description="Gradient descent as a collective dynamics of fields on the training set.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
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
    v.add_argument(
        "--parametrization", default="ntk", choices=["standard", "ntk", "mean_field"]
    )
    v.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    v.add_argument("--rtol", type=float, default=None, help="tolerance (default by dtype)")
    v.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return {"verify": _verify}[args.command](args)
    except (ValueError, TypeError) as err:
        print(f"gramflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
