"""One vmapped width sweep against a Python loop of separately jitted runs, and the
configurations per second of a seeds × lrs grid.

    python benchmarks/sweep.py            # 16 widths 16..256, P = 128, 200 steps, float32
    python benchmarks/sweep.py --quick    # tiny, for CI

Both sides include compilation (a loop compiles once per width, since shapes differ; the sweep
once per depth). Agreement is checked first.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import gramflow as gf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    n_widths, w_max, seeds, lrs = 16, 256, tuple(range(8)), (0.02, 0.05, 0.1, 0.2)
    if args.quick:
        n_widths, w_max, seeds, lrs, args.samples, args.steps = 4, 16, (0, 1), (0.05, 0.1), 16, 20
    widths = tuple(int(w) for w in np.linspace(w_max // n_widths, w_max, n_widths))
    X, y = gf.teacher_student(jax.random.key(0), samples=args.samples, in_dim=16,
                              dtype=jnp.float32)
    kw = dict(steps=args.steps, record_every=args.steps, observables=("loss",))
    depth, lr = 2, 0.05

    t0 = time.perf_counter()
    res = gf.sweep(X, y, widths=widths, depths=(depth,), seeds=(0,), lrs=(lr,), progress=False,
                   **kw)
    jax.block_until_ready(res.loss)
    t_sweep = time.perf_counter() - t0

    t0 = time.perf_counter()
    losses = []
    for w in widths:
        net = gf.ReLUNet.init(jax.random.key(0), X.shape[1], (w,) * depth, dtype=jnp.float32)
        losses.append(gf.simulate(net, X, y, lr=lr, **kw).loss)
    jax.block_until_ready(losses)
    t_loop = time.perf_counter() - t0
    err = float(np.max(np.abs(np.asarray(res.loss)[0, :, 0, 0] - np.stack(losses))
                       / np.abs(np.stack(losses))))
    assert err < 1e-3, f"sweep and loop disagree: {err:.1e}"  # float32 round-off, 200 steps

    print(f"sweep: P = {args.samples}, d = 16, L = {depth}, {args.steps} steps, float32, "
          f"{jax.devices()[0].platform} × {len(jax.devices())}")
    print(f"{len(widths)} widths {widths[0]}..{widths[-1]} (compile included in both): "
          f"vmapped sweep {t_sweep:.2f} s, loop of jitted runs {t_loop:.2f} s, "
          f"ratio {t_loop / t_sweep:.2f}x   (agreement {err:.1e})")

    n = len(seeds) * len(lrs)
    net_width = widths[len(widths) // 2]
    for label in ("first call (compile + run)", "second call (run)"):
        t0 = time.perf_counter()
        grid = gf.sweep(X, y, widths=(net_width,), depths=(depth,), seeds=seeds, lrs=lrs,
                        progress=False, **kw)
        jax.block_until_ready(grid.loss)
        dt = time.perf_counter() - t0
        print(f"seeds × lrs grid {len(seeds)} × {len(lrs)} = {n} configurations at width "
              f"{net_width}, {label}: {dt:.2f} s, {n / dt:.1f} configurations/s")


if __name__ == "__main__":
    main()
