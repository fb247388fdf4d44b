"""The closure experiment: error of each closure against the exact dynamics, by depth and width.

    python benchmarks/closure.py            # L = 1..4, widths 32/128/512, 3 seeds, 400 steps
    python benchmarks/closure.py --quick    # tiny, for CI

Depth is counted as the number of hidden (trained) layers L; with the fixed readout the
network has L + 1 weight layers, so "depth three" of the paper is L = 2. Float64; gradient
descent on ½ Σ r² with a fixed step; every closure runs beside the weights engine in one
scan (`reference=gf.Weights()`), seeds through `jax.vmap`.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import gramflow as gf


def table(study: gf.ClosureStudy) -> str:
    """Final-time error (mean over seeds) per closure and depth, one column per width."""
    final = study.final()
    head = f"{'closure':<17} {'L':>2}  " + "  ".join(f"{'N=' + str(w):>9}" for w in study.widths)
    lines = [head, "-" * len(head)]
    for c, name in enumerate(study.closures):
        for i, L in enumerate(study.depths):
            lines.append(f"{name:<17} {L:>2}  " + "  ".join(f"{e:>9.1e}" for e in final[c, i]))
    return "\n".join(lines)


def time_table(study: gf.ClosureStudy, width_index: int = -1) -> str:
    """Error against training time at one width, per closure and depth."""
    steps = np.asarray(study.step)
    cols = list(range(1, len(steps), max(1, (len(steps) - 1) // 4)))
    head = f"{'closure':<17} {'L':>2}  " + "  ".join(f"{'t=' + str(steps[t]):>9}" for t in cols)
    lines = [f"width {study.widths[width_index]}:", head, "-" * len(head)]
    err = np.asarray(study.error).mean(axis=3)
    for c, name in enumerate(study.closures):
        for i, L in enumerate(study.depths):
            lines.append(f"{name:<17} {L:>2}  "
                         + "  ".join(f"{err[c, i, width_index, t]:>9.1e}" for t in cols))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # a benchmark script is a top-level program
    if args.quick:
        # one depth (with transport) and one width bucket: every closure, few programs
        depths, widths, seeds, args.steps, args.samples = (2,), (8, 12), (0,), 40, 12
    else:
        depths, widths, seeds = (1, 2, 3, 4), (32, 128, 512), (0, 1, 2)
    X, y = gf.teacher_student(jax.random.key(0), samples=args.samples, in_dim=8)
    t0 = time.perf_counter()
    study = gf.closure_study(X, y, depths=depths, widths=widths, seeds=seeds, steps=args.steps,
                             lr=args.lr, record_every=max(1, args.steps // 8))
    elapsed = time.perf_counter() - t0
    print(f"closure experiment: teacher–student P = {args.samples}, d = 8, NTK, lr = {args.lr}, "
          f"{args.steps} steps, seeds {seeds}; depth L = hidden layers; float64; {elapsed:.0f} s")
    print("relative residual error ‖r − r_exact‖/‖r_exact‖ at the last step (mean over seeds)")
    print(table(study))
    print()
    print(time_table(study))
    return study


if __name__ == "__main__":
    main()
