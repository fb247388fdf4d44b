"""A million samples: the top eigenpairs of the collective kernel without ever forming it.

    python benchmarks/scale.py                  # P = 10⁶, widths 3 × 256, float32, top-10
    python benchmarks/scale.py --quick          # small P, for CI (< 20 s)
    python benchmarks/scale.py --P 200000 --iters 10 --sizes 50000 100000
    python benchmarks/scale.py --skip-eigs      # only the SGD step costs

`gf.kernel_eigs` runs a randomized block Krylov iteration on `gf.kernel_matvec`, whose
products with K go over blocks of samples (`Layer.matmat`): memory O(P Σ_l N_l), time
O(iters · (k + 5) · P Σ_l N_l N_{l-1}). Reported, in this order:

1. agreement first: at a small P the Krylov eigenpairs equal the dense `eigh` of
   `gf.collective_kernel` (eigenvalues, and the dense residual ‖K v − λ v‖/λ of each Krylov
   vector, so that near-degenerate pairs are judged by what they are, not by their basis);
2. the top-k eigenpairs at the large P: wall time (compile included), the residuals the
   iteration reports, and the peak resident memory of the process (`getrusage` maxrss,
   which also counts the inputs, the fields and the small runs before it);
3. time of one product K V with k + 5 vectors (`kernel_matvec`, fields included: one step
   of the Krylov iteration) vs P, medians after a compilation, and the log-log slope of a
   least-squares fit (1 = linear in P).

4. the time of one mini-batch SGD step of each engine vs P and batch size (`sgd_step_cost`),
   after checking that the collective engine equals the weights engine on the same batches.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # NumPy only computes reference values

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gramflow as gf


def problem(P, width, depth=3, d=64, seed=0):
    """Inputs on the sphere of radius √d and a 3-hidden-layer NTK network, float32."""
    X = jax.random.normal(jax.random.key(seed), (P, d), jnp.float32)
    X = X * jnp.sqrt(d) / jnp.linalg.norm(X, axis=1, keepdims=True)
    net = gf.ReLUNet.init(jax.random.key(seed + 1), d, (width,) * depth, dtype=jnp.float32)
    return net, X


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def agreement(P, width, k, iters, d):
    """Krylov eigenpairs against the dense `eigh` of the formed kernel, at a small P."""
    net, X = problem(P, width, d=d)
    K = np.asarray(gf.collective_kernel(net, X), np.float64)
    dense = np.linalg.eigvalsh(K)[::-1][:k]
    top = gf.kernel_eigs(net, X, k=k, iters=iters)
    assert int(top.iterations) == iters, "the dense fallback ran, not the Krylov path"
    values, vectors = np.asarray(top.values, np.float64), np.asarray(top.vectors, np.float64)
    err = float(np.max(np.abs(values - dense) / dense))
    residual = float(np.max(np.linalg.norm(K @ vectors - vectors * values, axis=0) / values))
    assert err < 1e-3, f"kernel_eigs disagrees with the dense spectrum: {err:.1e}"
    assert residual < 1e-2, f"the Krylov vectors are not eigenvectors of K: {residual:.1e}"
    print(f"agreement at P = {P}: eigenvalues vs dense eigh {err:.1e}, dense residual "
          f"‖Kv − λv‖/λ of the Krylov vectors {residual:.1e}", flush=True)
    return err, residual


def eigenpairs(P, width, k, iters, d):
    """Top-k eigenpairs at the large P: wall time, residuals, peak memory."""
    net, X = problem(P, width, d=d)
    jax.block_until_ready(X)
    t0 = time.perf_counter()
    top = gf.kernel_eigs(net, X, k=k, iters=iters)
    jax.block_until_ready(top.values)
    seconds = time.perf_counter() - t0
    rss = peak_rss_gb()
    res = np.asarray(top.residuals)
    print(f"top-{k} eigenpairs of K at P = {P}, widths 3 × {width}, float32: {seconds:.1f} s "
          f"(block Krylov, {iters} blocks of {k + 5}, compile included); residuals "
          f"‖Kv − λv‖/λ max {res.max():.1e}, median {np.median(res):.1e}; peak memory "
          f"(maxrss) {rss:.2f} GB", flush=True)
    print("   eigenvalues", np.asarray(top.values).round(3), flush=True)
    return seconds, float(res.max()), rss


def product_times(sizes, width, m, repeats, d):
    """Median time of one `kernel_matvec` with m vectors at each P (compiled first)."""
    rows = []
    for P in sizes:
        net, X = problem(P, width, d=d)
        V = jax.random.normal(jax.random.key(2), (P, m), jnp.float32)
        fn = jax.jit(gf.kernel_matvec)
        t0 = time.perf_counter()
        compiled = fn.lower(net, X, V).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(net, X, V))
            times.append(time.perf_counter() - t0)
        rows.append((P, statistics.median(times), compile_s))
        print(f"   P = {P:>8}: K V ({m} vectors) {rows[-1][1]:8.3f} s  "
              f"(compile {compile_s:.1f} s)", flush=True)
    if len(rows) > 1:
        slope = np.polyfit(np.log([r[0] for r in rows]), np.log([r[1] for r in rows]), 1)[0]
        print(f"   log-log slope of time vs P: {slope:.2f} (1 = linear)", flush=True)
    return rows


# -- 4. SGD step cost vs P and batch size --------------------------------------------------------


@eqx.filter_jit
def _steps(run, state, lr, batches):
    """`len(batches)` SGD steps of an engine's run, one `lax.scan`."""
    return jax.lax.scan(lambda st, b: run.step(st, lr, b), state, batches)


def _seconds_per_step(net, X, y, engine, B, steps, repeats):
    """Seconds per SGD step: an engine's own step (`run.step(state, lr, batch)`, what
    `simulate` scans) over `steps` batches in one compiled scan, median of `repeats` after
    a compilation — no records, no set-up (the frozen kernel's eigendecomposition)."""
    lr = jnp.asarray(1e-3, X.dtype)
    run = engine.build(net, X, y, lr, continuous=False)
    state = run.init()
    batches = gf.batch_schedule(jax.random.key(2), X.shape[0], B, steps)
    jax.block_until_ready(_steps(run, state, lr, batches))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(_steps(run, state, lr, batches))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / steps


def sgd_step_cost(sizes, batch_sizes, width, d, steps, repeats, frozen_max=4096) -> list:
    """Time per mini-batch SGD step of each engine vs P and B, after checking that the
    collective engine equals the weights engine on the same batches. The weights engine runs
    forward and backward on the batch rows (O(B)); the collective engine moves every site,
    those outside the batch as spectators (O(P)); the frozen kernel steps
    `r ← r − η K₀ (m ⊙ r)` (O(P²), only up to `frozen_max`)."""
    net, X = problem(min(sizes), width, d=d)
    y = jnp.sin(X[:, 0])
    kw = dict(steps=10, lr=1e-2, batch_size=min(batch_sizes), key=jax.random.key(3))
    a = gf.simulate(net, X, y, **kw).r
    b = gf.simulate(net, X, y, engine=gf.Collective(), **kw).r
    err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    print(f"SGD agreement at P = {min(sizes)}: collective vs weights engine on the same "
          f"batches, relative {err:.1e} (float32)", flush=True)
    assert err < 1e-4, err
    engines = {"weights": gf.Weights(), "collective": gf.Collective(),
               "frozen_kernel": gf.FrozenKernel()}
    print(f"SGD step cost, ms per step (median of {repeats} scans of {steps} steps):",
          flush=True)
    print(f"{'P':>10} {'B':>6} " + "".join(f"{name:>15}" for name in engines), flush=True)
    rows = []
    for P in sizes:
        net, X = problem(P, width, d=d)
        y = jnp.sin(X[:, 0])
        for B in batch_sizes:
            if B > P:
                continue
            row = {"P": P, "B": B}
            for name, engine in engines.items():
                skip = name == "frozen_kernel" and P > frozen_max
                row[name] = None if skip else 1e3 * _seconds_per_step(
                    net, X, y, engine, B, steps, repeats)
            rows.append(row)
            print(f"{P:>10} {B:>6} " + "".join(
                f"{'—' if row[n] is None else format(row[n], '.3f'):>15}" for n in engines),
                flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small P (CI)")
    parser.add_argument("--P", type=int, default=1_000_000, help="samples of the eigenpairs")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--iters", type=int, default=8, help="Krylov blocks")
    parser.add_argument("--d", type=int, default=64, help="input dimension")
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[50_000, 100_000, 200_000, 500_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sgd-sizes", type=int, nargs="+", default=[2048, 16384, 131072],
                        help="P of the SGD step costs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--sgd-steps", type=int, default=20)
    parser.add_argument("--skip-eigs", action="store_true", help="only the SGD step costs")
    args = parser.parse_args(argv)
    small = 2048
    if args.quick:
        args.P, args.width, args.d, args.repeats = 2048, 32, 16, 2
        args.sizes, small = [1024, 2048], 512
        args.sgd_sizes, args.batch_sizes, args.sgd_steps = [512], [16], 4
    print(f"kernel eigenpairs at large P, 3 hidden layers of {args.width}, float32, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{os.cpu_count()} cores; jax {jax.__version__}", flush=True)
    if not args.skip_eigs:
        agreement(small, args.width, args.k, args.iters, args.d)
        eigenpairs(args.P, args.width, args.k, args.iters, args.d)
        print(f"time vs P (median of {args.repeats}):", flush=True)
        product_times(args.sizes, args.width, args.k + 5, args.repeats, args.d)
    sgd_step_cost(args.sgd_sizes, args.batch_sizes, args.width, args.d, args.sgd_steps,
                  args.repeats)
    print(f"peak memory (maxrss) at the end: {peak_rss_gb():.2f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
