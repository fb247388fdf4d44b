"""The structure experiment: plain, pathway-masked and corrected networks against depth.

    python benchmarks/structure.py            # teacher–student and digits, L = 1..7, 3 seeds
    python benchmarks/structure.py --quick    # tiny, for CI

Depth is counted as hidden (trained) layers L; with the fixed readout the network has L + 1
weight layers, so L = 1..7 is "depth 2–8". Float64 throughout.

1. Agreement first: for every structure, the structured kernel (masked Grams over the mask's
   bicliques, plus the gain and skip terms) against `jax.jacrev` J Jᵀ of an independent plain
   function, and the collective engine against gradient descent on the weights.
2. Cost of the masked kernel: medians of the biclique Hadamard form, the dense kernel of the
   same widths, and J Jᵀ from per-weight Jacobians, side by side in one run.
3. The study (`gramflow.diagnostics.structure_study`): convergence speed, loss-curve
   smoothness, sharpness, spectral sensitivity, robustness and conditioning per structure and
   depth, means over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp

import gramflow as gf
from gramflow.model.network import structure_kwargs, trainable
from gramflow.diagnostics import default_structures

SHOWN = ("lr", "condition", "steps_to_target", "final_ratio", "nonmonotone", "roughness",
         "sharpness_final", "eta_sharpness", "sensitivity_weights", "robust_input_loss",
         "robust_weight_kernel")


def _plain_f(net, X):
    z = X
    for l, W in enumerate(net.weights):
        if net.masks is not None and net.masks[l] is not None:
            W = jnp.where(net.masks[l].array, W, 0.0)
        h = net.scales[l] * (z @ W.T) * (1.0 if net.gains is None else net.gains[l])
        if net.skips is not None and net.skips[l] is not None:
            h = h + net.skips[l] * z
        z = jax.nn.relu(h)
    return net.scales[-1] * (z @ net.readout)


def _jjt(net, X):
    spec = trainable(net)
    params, rest = eqx.partition(net, spec)
    J = jax.jacrev(lambda p: _plain_f(eqx.combine(p, rest), X))(params)
    J = jnp.concatenate([j.reshape(X.shape[0], -1) for j in jax.tree.leaves(J)], axis=1)
    return J @ J.T


def agreement(X, y, width, depth, names=None):
    print(f"agreement (P = {X.shape[0]}, widths {(width,) * depth}, float64):")
    print(f"  {'structure':<10} {'kernel vs jacrev':>17} {'collective vs GD':>17}")
    worst = 0.0
    for name, structure in default_structures().items():
        if names is not None and name not in names:
            continue
        arch = (width,) * depth
        kw = structure_kwargs(structure, X.shape[1], arch)
        net = gf.ReLUNet.init(jax.random.key(0), X.shape[1], arch, **kw)
        K, K_ref = gf.collective_kernel(net, X), _jjt(net, X)
        e_k = float(jnp.linalg.norm(K - K_ref) / jnp.linalg.norm(K_ref))
        w = gf.simulate(net, X, y, steps=20, lr=0.02, observables=("r",))
        c = gf.simulate(net, X, y, steps=20, lr=0.02, engine=gf.Collective(),
                        observables=("r",))
        e_c = float(jnp.linalg.norm(c.r - w.r) / jnp.linalg.norm(w.r))
        worst = max(worst, e_k, e_c)
        print(f"  {name:<10} {e_k:>17.1e} {e_c:>17.1e}")
    if not worst <= 1e-10:
        raise SystemExit(f"agreement check failed: {worst:.1e} > 1e-10")


def _median(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_cost(P, width, depth, repeats, kinds=None):
    X = jax.random.normal(jax.random.key(1), (P, 16))
    arch = (width,) * depth
    dense = gf.ReLUNet.init(jax.random.key(0), 16, arch)
    print(f"\nkernel cost (P = {P}, widths {arch}, float64, median of {repeats}):")
    print(f"  {'mask':<22} {'density':>7} {'bicliques':>9} {'masked K':>10} {'dense K':>10} "
          f"{'jacrev JJᵀ':>11} {'masked/dense':>12} {'jacrev/masked':>13}")
    t_dense = _median(lambda n, x: gf.collective_kernel(n, x), (dense, X), repeats)
    all_kinds = {
        "block-diagonal 4": lambda s: gf.Mask.block_diagonal(s, 4),
        "block-diagonal 16": lambda s: gf.Mask.block_diagonal(s, 16),
        "banded ±2": lambda s: gf.Mask.banded(s, 2),
        "random 10%": lambda s: gf.Mask.random(s, 0.1, seed=s[0]),
    }
    for name, make in all_kinds.items():
        if kinds is not None and name not in kinds:
            continue
        masks = [None] + [make((width, width)) for _ in range(depth - 1)]
        net = gf.ReLUNet.init(jax.random.key(0), 16, arch, masks=masks)
        ok = jnp.linalg.norm(gf.collective_kernel(net, X[:64]) - _jjt(net, X[:64]))
        assert float(ok) <= 1e-10 * float(jnp.linalg.norm(_jjt(net, X[:64])))
        t_m = _median(lambda n, x: gf.collective_kernel(n, x), (net, X), repeats)
        t_j = _median(_jjt, (net, X), max(1, repeats // 2))
        m = masks[-1]
        print(f"  {name:<22} {m.density:>7.3f} {len(m.bicliques):>9} {1e3 * t_m:>8.1f}ms "
              f"{1e3 * t_dense:>8.1f}ms {1e3 * t_j:>9.1f}ms {t_m / t_dense:>12.2f} "
              f"{t_j / t_m:>13.1f}")


def study(name, X, y, *, depths, width, seeds, steps, progress, structures=None):
    t0 = time.perf_counter()
    st = gf.diagnostics.structure_study(X, y, depths=depths, width=width, seeds=seeds,
                                        steps=steps, progress=progress, structures=structures)
    print(f"\n{name}: P = {X.shape[0]}, d = {X.shape[1]}, width {width}, seeds {tuple(seeds)}, "
          f"{steps} GD steps at η = 1/λ_max(K₀), target L ≤ 1e-2 L₀ "
          f"({time.perf_counter() - t0:.0f} s)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps_to_target
        print(st.table(SHOWN))
    return st


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--datasets", default="teacher,digits",
                        help="comma-separated: teacher, digits (default both)")
    parser.add_argument("--skip-cost", action="store_true", help="skip the kernel-cost table")
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",")
    jax.config.update("jax_enable_x64", True)
    X, y = gf.teacher_student(jax.random.key(0), samples=24 if args.quick else 64, in_dim=8)
    if args.quick:  # one structure with every term (mask, gain, skip): a fraction of the compile
        agreement(X[:12], y[:12], width=6, depth=3, names=("both",))
        # The two forms of the masked kernel (few large blocks, many small ones).
        kernel_cost(P=64, width=32, depth=2, repeats=3, kinds=("block-diagonal 4", "random 10%"))
        both = {"both": default_structures()["both"]}
        study("teacher–student", X, y, depths=(2,), width=6, seeds=(0,), steps=10,
              progress=False, structures=both)
        return 0
    agreement(X[:12], y[:12], width=6, depth=3)
    if not args.skip_cost:
        kernel_cost(P=512, width=256, depth=3, repeats=5)
    depths, seeds = (1, 2, 3, 4, 5, 6, 7), (0, 1, 2)
    if "teacher" in datasets:
        study("teacher–student", X, y, depths=depths, width=32, seeds=seeds, steps=400,
              progress=True)
    if "digits" in datasets:
        Xd, yd = gf.load_digits(samples=128, key=jax.random.key(0))
        study("digits (0–4 vs 5–9)", Xd, yd, depths=depths, width=32, seeds=seeds, steps=400,
              progress=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
