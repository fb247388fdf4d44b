"""Finite against infinite width: how far trained networks are from their lazy limit.

    python benchmarks/limits.py            # widths 32 … 4096, 3 seeds, ntk and mean field
    python benchmarks/limits.py --quick    # tiny, for CI

1. Agreement first: the analytic limit kernels (arc-cosine recursion) against the mean of
   finite kernels of wide networks, and lazy predictions against the frozen-kernel engine.
2. The study (`gramflow.limit_study`): per width, ‖K₀ − Θ‖/‖Θ‖ per layer and in total,
   kernel drift over training, the test loss of the trained network against the lazy
   predictions from its own K₀ and from Θ, for ntk and mean field at several γ₀; log-log
   slopes against width beside the known rates (fluctuations ~ N^{-1/2}; Lee et al. 2019,
   Dyer & Gur-Ari 2020). Float64, teacher–student data (P = 128 train, 128 test).

The step is `η = natural_lr(net, η₀)` with `η₀ = 0.5 / λ_max(Θ)` (Θ the limit of the total
kernel, the same for every width): `η λ_max(K₀) ≈ 0.5` at every width and parametrization,
inside the lazy stability limit 2, where the lazy predictions stay finite. (With `η₀ = 0.5`
and P = 128, `η λ_max` is about 4.3, above 2: the lazy predictions diverge and the networks
leave the lazy regime at every width.)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import gramflow as gf


def agreement(X, y, width, seeds):
    net = gf.ReLUNet.init(jax.random.key(0), X.shape[1], (width, width), parametrization="ntk")
    lim = gf.limit_kernels(net, X).total
    mean = sum(gf.collective_kernel(gf.ReLUNet.init(jax.random.key(s), X.shape[1],
                                                    (width, width), parametrization="ntk"), X)
               for s in range(seeds)) / seeds
    e_lim = float(jnp.linalg.norm(mean - lim) / jnp.linalg.norm(lim))
    K = gf.collective_kernel(net, X)
    lazy = gf.lazy_predictions(K, y, net(X), lr=0.5, steps=jnp.arange(11))
    run = gf.simulate(net, X, y, steps=10, lr=0.5, engine=gf.FrozenKernel(), observables=("r",))
    e_lazy = float(jnp.linalg.norm(lazy.r - run.r) / jnp.linalg.norm(run.r))
    print(f"agreement: mean of {seeds} finite kernels (width {width}) vs limit: {e_lim:.1e}; "
          f"lazy predictions vs frozen-kernel engine: {e_lazy:.1e}")
    if not e_lazy <= 1e-10:
        raise SystemExit(f"lazy predictions disagree with the frozen-kernel engine: {e_lazy:.1e}")
    if not e_lim <= 3.0 / width**0.5:
        raise SystemExit(f"finite kernels do not approach the limit: {e_lim:.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--widths", type=int, nargs="+",
                        default=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    P = 16 if args.quick else 128
    X, y = gf.teacher_student(jax.random.key(0), samples=2 * P, in_dim=8)
    X, y, Xt, yt = X[:P], y[:P], X[P:], y[P:]
    agreement(X, y, width=64 if args.quick else 1024, seeds=2 if args.quick else 8)
    if args.quick:
        widths, seeds, steps = (8, 32), (0,), 5
        settings = (("ntk", 1.0), ("mean_field", 0.1))
    else:
        widths, seeds, steps = tuple(args.widths), (0, 1, 2), 200
        settings = (("ntk", 1.0), ("mean_field", 1.0), ("mean_field", 0.1))
    theta = gf.limit_kernels(gf.ReLUNet.init(jax.random.key(0), X.shape[1], (1, 1)), X).total
    eta0 = 0.5 / float(jnp.linalg.eigvalsh(theta)[-1])
    t0 = time.perf_counter()
    study = gf.limit_study(X, y, Xt, yt, widths=widths, seeds=seeds, settings=settings,
                           steps=steps, eta0=eta0, progress=not args.quick)
    print(f"\nlimit study: P = {P} train / {P} test, L = 2, {steps} GD steps at "
          f"η = natural_lr(net, η₀), η₀ = 0.5 / λ_max(Θ) = {eta0:.3g}, seeds {seeds} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(study.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
