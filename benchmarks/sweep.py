"""A widths × seeds × lrs sweep against a loop of `simulate` calls, and a repeated sweep against
the pure run time of its compiled core.

    python benchmarks/sweep.py            # 3 widths × 8 seeds × 4 lrs, P = 64, L = 2, 200 steps
    python benchmarks/sweep.py --quick    # tiny, for CI

1. First calls, compilation included on both sides: `gf.sweep` over the grid (one program
   builds every network, one more runs every width bucket's seeds × lrs) against a Python
   loop of `gf.simulate` (the lr is traced, so the loop compiles once per width and then runs
   every seed and lr). JAX's one-time start-up is paid before either, by an unrelated program.
2. Repeated calls: an identical second `gf.sweep` (which reuses its compiled programs: no
   tracing) against the pure run time of those programs, called on the inputs the sweep
   gave them.

Agreement is checked first; times are medians over `--repeats` runs (first calls: once).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import gramflow as gf
import gramflow.dynamics.sweep as sweep_module


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    widths, seeds, lrs, depth = (32, 64, 128), tuple(range(8)), (0.02, 0.05, 0.1, 0.2), 2
    if args.quick:
        widths, seeds, lrs, args.samples, args.steps, args.repeats = (4, 8), (0, 1), (0.05,), 12, 10, 2
    X, y = gf.teacher_student(jax.random.key(0), samples=args.samples, in_dim=16,
                              dtype=jnp.float32)
    kw = dict(steps=args.steps, record_every=args.steps, observables=("loss",))
    grid = dict(widths=widths, depths=(depth,), seeds=seeds, lrs=lrs, progress=False, **kw)

    def loop():
        out = np.zeros((len(widths), len(seeds), len(lrs)), np.float32)
        for (i, w), (j, s), (k, lr) in itertools.product(enumerate(widths), enumerate(seeds),
                                                          enumerate(lrs)):
            net = gf.ReLUNet.init(jax.random.key(s), X.shape[1], (w,) * depth, dtype=X.dtype)
            out[i, j, k] = gf.simulate(net, X, y, lr=lr, **kw).loss[-1]
        return out

    # JAX's own start-up (backend, compiler, lowering machinery: about 0.3 s, paid by the first
    # compilation in a process) is paid before either side, by a program of neither; then
    # each side starts from empty compilation caches (neither reuses the other's programs).
    def unrelated(key, x):
        w = jax.random.normal(key, (8, 8))
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), c.sum()), x, None, length=3)

    jax.block_until_ready(jax.jit(unrelated)(jax.random.key(1), jnp.ones((2, 8))))
    jax.clear_caches()
    t_sweep, res = _timed(lambda: gf.sweep(X, y, **grid).loss)
    jax.clear_caches()
    t_loop, looped = _timed(loop)
    err = float(np.max(np.abs(np.asarray(res)[0, ..., -1] - looped) / np.abs(looped)))
    # float32 round-off (summation order differs under vmap), amplified over the steps
    assert err < 1e-2, f"sweep and loop disagree: {err:.1e}"

    # The loop's side cleared the caches: one call compiles the sweep's programs again (and
    # records the calls of its compiled core: each chunk's program and inputs), then the
    # identical calls reuse them.
    calls = []
    real = sweep_module._run_chunk
    sweep_module._run_chunk = lambda fn, nets, lrs, sharding: (  # noqa: E731
        calls.append((fn, nets, lrs)) or real(fn, nets, lrs, sharding))
    try:
        _timed(lambda: gf.sweep(X, y, **grid).loss)
    finally:
        sweep_module._run_chunk = real
    repeated = statistics.median(_timed(lambda: gf.sweep(X, y, **grid).loss)[0]
                                 for _ in range(args.repeats))
    # The pure run: the driver's compiled programs called on the inputs it gave them (its
    # networks, padded and gathered as it runs them), nothing else.
    run = lambda: [fn(nets, lrs) for fn, nets, lrs in calls]  # noqa: E731
    _timed(run)  # warm-up (the driver compiled these programs already)
    pure = statistics.median(_timed(run)[0] for _ in range(args.repeats))

    n = len(widths) * len(seeds) * len(lrs)
    print(f"sweep: P = {args.samples}, d = 16, L = {depth}, {args.steps} steps, float32, "
          f"{jax.devices()[0].platform} × {len(jax.devices())}; grid {len(widths)} widths "
          f"{widths} × {len(seeds)} seeds × {len(lrs)} lrs = {n} runs (agreement {err:.1e})")
    print(f"first call, compile included:  sweep {t_sweep:6.2f} s   loop of simulate "
          f"{t_loop:6.2f} s   loop / sweep = {t_loop / t_sweep:5.2f}x   (target ≥ 2x)")
    print(f"repeated call (median of {args.repeats}): sweep {repeated:6.3f} s   pure run "
          f"{pure:6.3f} s   sweep / pure = {repeated / pure:5.2f}x   (target ≤ 1.1x)")


if __name__ == "__main__":
    main()
