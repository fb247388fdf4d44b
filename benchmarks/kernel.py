"""The collective kernel against what a user would otherwise use, and against the machine.

    python benchmarks/kernel.py                 # P ∈ {128, 512, 2048}, widths {256, 1024}
    python benchmarks/kernel.py --quick         # tiny, for CI
    python benchmarks/kernel.py --spectrum      # also: top-10 eigenvalues at P = 50 000

Methods, all on 3 hidden layers with a fixed readout (NTK scaling), float32:

- `gramflow`        `gf.collective_kernel` (block-upper-triangle Gram products for P ≥ 1024);
- `gram (naive)`    the layer-wise formula Σ_l s_l² (Z Zᵀ) ⊙ (Δ Δᵀ) with full Gram products;
- `jacrev J Jᵀ`     full Jacobian by `jax.jacrev`, then J Jᵀ;
- `ntk-vp`          K column by column as jvp(vjp(e_ν)) (NTK-vector products), vmapped;
- `neural-tangents` `nt.empirical_ntk_fn` (Jacobian contraction, NTK-vector products,
                    structured derivatives, the latter also with weights stored transposed),
                    in its own venv with versions where it imports (`benchmarks/nt_env.sh`),
                    as a subprocess; reported as missing when that venv does not exist.

Agreement with gramflow is checked before anything is timed. Times are medians of ≥ 7 runs
after a warm-up, with `block_until_ready`; compile time separately; peak memory is XLA's
compile-time estimate (arguments + outputs + temporaries). A method is skipped, and says so,
when its estimated memory or time exceeds the caps.

The limit: the FLOPs a method actually does (forward, backward recursion, two Gram products
per layer — for gramflow only the block-upper triangle of each Gram product when its cost
model picks that form) divided by the time, over the matmul throughput measured in the same
run on a `jnp.dot` of comparable shape ((P, N) × (N, P)): the fraction of the machine's
matmul speed the method runs at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import gramflow as gf
from gramflow.fields.kernels import _kernel_tile, _use_triangle
from gramflow.fields.state import fields

HERE = os.path.dirname(os.path.abspath(__file__))
NT_PYTHON = os.path.join(HERE, ".nt-venv", "bin", "python")
MEMORY_CAP = 6 * 2**30
TIME_CAP = 120.0  # seconds per call, estimated from FLOPs


def _median_time(fn, args, repeats, check=None):
    """Compile (timed), run once and `check` the output, then the median of `repeats` runs."""
    compiled_t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - compiled_t0
    out = jax.block_until_ready(compiled(*args))
    if check is not None:
        check(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes)
    return statistics.median(times), compile_s, peak


def naive_flops(P, widths, gram_fraction=1.0):
    """Forward + backward recursion + two Gram products and a Hadamard per layer, with only
    `gram_fraction` of the Gram entries computed."""
    fwd = sum(2 * P * a * b for a, b in zip(widths[:-1], widths[1:]))
    bwd = sum(2 * P * a * b for a, b in zip(widths[1:-1], widths[2:]))
    grams = sum(2 * P * P * (a + b) + 2 * P * P for a, b in zip(widths[:-1], widths[1:]))
    return fwd + bwd + gram_fraction * grams


def gramflow_flops(net, P):
    """The FLOPs `gf.collective_kernel` actually does: the naive count, with the Gram
    products restricted to the block-upper triangle when the cost model picks that form
    (`nb (nb + 1) / 2` tiles of `b²` entries, on P padded to `nb · b`)."""
    cost = gf.CostModel.default()
    fraction = 1.0
    if _use_triangle(P, net, cost):
        b = cost.triangle_block
        nb = -(-P // b)
        fraction = nb * (nb + 1) / 2 * b * b / (P * P)
    return naive_flops(P, (net.in_dim, *net.widths), fraction)


def matmul_throughput(P, N, repeats):
    A = jax.random.normal(jax.random.key(7), (P, N), jnp.float32)
    B = jax.random.normal(jax.random.key(8), (P, N), jnp.float32)
    t, _, _ = _median_time(lambda a, b: jnp.dot(a, b.T), (A, B), repeats)
    return 2 * P * P * N / t


def _plain_f(weights, readout, scales, X):
    z = X
    for s, W in zip(scales[:-1], weights):
        z = jax.nn.relu(s * (z @ W.T))
    return scales[-1] * (z @ readout)


def methods(net):
    """name -> (fn(weights, X) -> K, bytes estimate(P), flops estimate(P))."""
    n_params = sum(w.size for w in net.weights)
    widths = (net.in_dim, *net.widths)
    readout, scales = net.readout, net.scales

    def gramflow_kernel(ws, X):
        return gf.collective_kernel(eqx_replace(net, ws), X)

    def naive(ws, X):
        n = eqx_replace(net, ws)
        _, Z, _, _, Delta, _ = fields(n, X)
        return _kernel_tile(n, Z, Delta, Z, Delta, gf.CostModel.default())

    def jacrev_jjt(ws, X):
        J = jax.jacrev(lambda w: _plain_f(w, readout, scales, X))(ws)
        J = jnp.concatenate([j.reshape(X.shape[0], -1) for j in J], axis=1)
        return J @ J.T

    def ntk_vp(ws, X):
        f = lambda w: _plain_f(w, readout, scales, X)  # noqa: E731
        _, vjp = jax.vjp(f, ws)

        def column(e):
            return jax.jvp(f, (ws,), vjp(e))[1]

        return jax.vmap(column)(jnp.eye(X.shape[0], dtype=X.dtype))

    fwd = lambda P: 2 * P * sum(a * b for a, b in zip(widths[:-1], widths[1:]))  # noqa: E731
    return {
        "gramflow": (gramflow_kernel, lambda P: 8 * P * P + 16 * P * sum(widths),
                     lambda P: gramflow_flops(net, P)),
        "gram (naive)": (naive, lambda P: 12 * P * P + 16 * P * sum(widths),
                         lambda P: naive_flops(P, widths)),
        "jacrev J Jᵀ": (jacrev_jjt, lambda P: 8 * P * n_params + 4 * P * P,
                        lambda P: 2 * P * P * n_params + 3 * fwd(P) * P),
        "ntk-vp": (ntk_vp, lambda P: 12 * P * P * max(widths) + 4 * P * P,
                   lambda P: 4 * P * fwd(P)),
    }


def eqx_replace(net, weights):
    import equinox as eqx

    return eqx.tree_at(lambda n: n.weights, net, tuple(weights))


def run_neural_tangents(net, X, K_ref, repeats):
    """neural-tangents in its own venv, as a subprocess; None when the venv is missing."""
    if not os.path.exists(NT_PYTHON):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.npz")
        np.savez(path, X=np.asarray(X), readout=np.asarray(net.readout),
                 scales=np.asarray(net.scales), K=np.asarray(K_ref),
                 **{f"W{i}": np.asarray(w) for i, w in enumerate(net.weights)})
        proc = subprocess.run([NT_PYTHON, os.path.join(HERE, "_nt_kernel.py"), path,
                               str(repeats), str(MEMORY_CAP)],
                              capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(sizes, widths_list, repeats, d=64, only=None, with_nt=True):
    rows = []
    for N in widths_list:
        for P in sizes:
            X = jax.random.normal(jax.random.key(0), (P, d), jnp.float32)
            X = X * jnp.sqrt(d) / jnp.linalg.norm(X, axis=1, keepdims=True)
            net = gf.ReLUNet.init(jax.random.key(1), d, (N, N, N), dtype=jnp.float32)
            thr = matmul_throughput(P, N, repeats)
            K_ref = None
            for name, (fn, mem, flops) in methods(net).items():
                if only is not None and name not in only:
                    continue
                est_t = flops(P) / thr
                if mem(P) > MEMORY_CAP or est_t > TIME_CAP:
                    why = (f"memory ~{mem(P) / 2**30:.1f} GiB" if mem(P) > MEMORY_CAP
                           else f"time ~{est_t:.0f} s")
                    rows.append(dict(P=P, N=N, method=name, skipped=why))
                    continue
                agreement = {}

                def check(K, name=name):
                    nonlocal K_ref
                    K_ref = K if K_ref is None else K_ref
                    err = float(jnp.linalg.norm(K - K_ref) / jnp.linalg.norm(K_ref))
                    assert err < 1e-4, f"{name} disagrees with gramflow: {err:.1e}"
                    agreement["err"] = err

                t, c, peak = _median_time(fn, (net.weights, X), repeats, check)
                err = agreement["err"]
                rows.append(dict(P=P, N=N, method=name, ms=1e3 * t, compile_s=c,
                                 peak_mib=None if peak is None else peak / 2**20, err=err,
                                 fraction=(flops(P) / t / thr if name.startswith("gram")
                                           else None)))
            nt = run_neural_tangents(net, X, K_ref, repeats) if with_nt else {}
            if nt is None:
                rows.append(dict(P=P, N=N, method="neural-tangents",
                                 skipped="venv missing: run benchmarks/nt_env.sh"))
            elif "error" in nt:
                rows.append(dict(P=P, N=N, method="neural-tangents", skipped=nt["error"]))
            else:
                for name, r in nt.items():
                    rows.append(dict(P=P, N=N, method=f"nt: {name}", **r))
            base = next(r["ms"] for r in rows if r["P"] == P and r["N"] == N
                        and r["method"] == "gramflow")
            for r in rows:
                if r["P"] == P and r["N"] == N and "ms" in r:
                    r["vs_gramflow"] = r["ms"] / base
            rows.append(dict(P=P, N=N, method="matmul GFLOP/s", value=thr / 1e9))
    return rows


def print_rows(rows):
    head = (f"{'P':>5} {'N':>5}  {'method':<32} {'ms':>10} {'× gramflow':>10} "
            f"{'compile s':>9} {'peak MiB':>9} {'rel err':>8} {'of limit':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "value" in r:
            print(f"{r['P']:>5} {r['N']:>5}  {'(machine) matmul GFLOP/s':<32} {r['value']:>10.1f}")
        elif "skipped" in r:
            print(f"{r['P']:>5} {r['N']:>5}  {r['method']:<32} skipped: {r['skipped']}")
        else:
            peak = "" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
            frac = "" if r.get("fraction") is None else f"{r['fraction']:.2f}"
            print(f"{r['P']:>5} {r['N']:>5}  {r['method']:<32} {r['ms']:>10.2f} "
                  f"{r.get('vs_gramflow', float('nan')):>9.2f}x {r['compile_s']:>9.2f} "
                  f"{peak:>9} {r['err']:>8.1e} {frac:>8}")


def spectrum(P, N, k=10, d=64):
    X = jax.random.normal(jax.random.key(0), (P, d), jnp.float32)
    X = X * jnp.sqrt(d) / jnp.linalg.norm(X, axis=1, keepdims=True)
    net = gf.ReLUNet.init(jax.random.key(1), d, (N, N, N), dtype=jnp.float32)
    small = min(P, 2048)
    dense = np.linalg.eigvalsh(np.asarray(gf.collective_kernel(net, X[:small]),
                                          np.float64))[::-1][:k]
    check = gf.kernel_eigs(net, X[:small], k=k)
    err = float(np.max(np.abs(np.asarray(check.values) - dense) / dense))
    assert err < 1e-3, f"kernel_eigs disagrees with the dense spectrum: {err:.1e}"
    t0 = time.perf_counter()
    top = gf.kernel_eigs(net, X, k=k)
    jax.block_until_ready(top.values)
    t = time.perf_counter() - t0
    print(f"top-{k} eigenvalues of K at P = {P}, widths 3 × {N}, float32: {t:.1f} s "
          f"(block Krylov, {int(top.iterations)} blocks, compile included; max residual "
          f"‖Kv − λv‖/λ = {float(top.residuals.max()):.1e}; agreement with the dense spectrum "
          f"at P = {small}: {err:.1e})")
    print("  ", np.asarray(top.values).round(3))
    return t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--spectrum", action="store_true", help="top-10 spectrum at P = 50 000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--only", nargs="+", help="a subset of the methods, e.g. gramflow")
    parser.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    args = parser.parse_args(argv)
    sizes, widths = tuple(args.sizes), tuple(args.widths)
    if args.quick:
        sizes, widths, args.repeats = (32,), (16,), 3
    print(f"collective kernel, 3 hidden layers, float32, {jax.devices()[0].platform}, "
          f"median of {args.repeats}; jax {jax.__version__}")
    print_rows(benchmark(sizes, widths, args.repeats, only=args.only, with_nt=not args.no_nt))
    if args.spectrum or args.quick:
        # quick: P = 512 still takes the Krylov path (iters·(k + 5) < P / 2), dense check cheap
        spectrum(512 if args.quick else 50_000, 16 if args.quick else 256, k=3 if args.quick else 10)


if __name__ == "__main__":
    sys.exit(main())
