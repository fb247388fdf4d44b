"""Time per gradient-descent step of each engine against optax weight GD, side by side.

    python benchmarks/simulate.py            # P = 512, d = 32, width 512, float32
    python benchmarks/simulate.py --quick    # tiny sizes, for CI

Checks agreement first (the collective engine against the weights engine in one scan), then
times whole `simulate` calls (one compiled `lax.scan` each) after a warm-up, with
`block_until_ready`, and prints medians and ratios measured in the same run. Compile time is
reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import gramflow as gf

ENGINES = {"weights": gf.Weights(), "collective": gf.Collective(),
           "frozen_kernel": gf.FrozenKernel()}


def _time(fn, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())  # compile + first run
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--in-dim", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.in_dim, args.width, args.steps, args.repeats = 32, 8, 32, 20, 3
    P, d, N, T = args.samples, args.in_dim, args.width, args.steps
    X, y = gf.teacher_student(jax.random.key(0), samples=P, in_dim=d, dtype=jnp.float32)
    print(f"simulate: P = {P}, d = {d}, width {N}, {T} steps per call, float32, "
          f"median of {args.repeats} after warm-up; {jax.devices()[0].platform}")
    header = f"{'L':>2}  {'observables':<11}  {'engine':<14}  {'ms/step':>9}  {'vs weights':>10}  {'compile s':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for L in (2,) if args.quick else (1, 3):  # quick: one depth with transport, every engine
        net = gf.ReLUNet.init(jax.random.key(1), d, (N,) * L, dtype=jnp.float32)
        K = gf.collective_kernel(net, X)
        lr = float(0.5 / jnp.linalg.eigvalsh(K)[-1])
        check = gf.simulate(net, X, y, steps=T, lr=lr, engine=gf.Collective(),
                            reference=gf.Weights(), observables=("loss",), record_every=T)
        err = float(check.observables["closure_error"].max())
        assert err < 1e-3, f"collective and weights engines disagree: {err:.2e}"
        for obs_name, obs in [("loss only", ("loss",)), ("default", None)]:
            base = None
            for name, engine in ENGINES.items():
                if name == "frozen_kernel" and obs is None:
                    continue
                fn = lambda: gf.simulate(net, X, y, steps=T, lr=lr, engine=engine,  # noqa: E731
                                         observables=obs, record_every=10)
                med, first = _time(fn, args.repeats)
                base = med if name == "weights" else base
                rows.append((L, obs_name, name, med, first))
                print(f"{L:>2}  {obs_name:<11}  {name:<14}  {1e3 * med / T:>9.3f}  "
                      f"{med / base:>9.2f}x  {first - med:>9.2f}")
        print(f"    agreement (L = {L}): max relative residual error collective vs weights {err:.1e}")
    return rows


if __name__ == "__main__":
    main()
