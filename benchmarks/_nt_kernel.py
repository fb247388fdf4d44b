"""neural-tangents' empirical NTK on a problem saved by benchmarks/kernel.py.

Runs inside benchmarks/.nt-venv (see nt_env.sh); prints one JSON line of results.
Usage: _nt_kernel.py PROBLEM.npz REPEATS MEMORY_CAP_BYTES
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np


def main(path, repeats, cap):
    data = np.load(path)
    X, readout, scales, K_ref = (jnp.asarray(data[k]) for k in ("X", "readout", "scales", "K"))
    L = len([k for k in data.files if k.startswith("W")])
    weights = [jnp.asarray(data[f"W{i}"]) for i in range(L)]

    def f(params, x):  # weights (N, fan_in), as gramflow stores them
        z = x
        for s, W in zip(scales[:-1], params):
            z = jax.nn.relu(s * (z @ W.T))
        return scales[-1] * (z @ readout)

    def f_t(params, x):  # weights stored transposed, (fan_in, N): they feed the matmul
        z = x
        for s, Wt in zip(scales[:-1], params):
            z = jax.nn.relu(s * (z @ Wt))
        return scales[-1] * (z @ readout)

    P = X.shape[0]
    n_params = sum(w.size for w in weights)
    impl = nt.NtkImplementation
    runs = {
        "jacobian contraction": (f, weights, impl.JACOBIAN_CONTRACTION, 4 * P * n_params * 2),
        "ntk-vector products": (f, weights, impl.NTK_VECTOR_PRODUCTS,
                                4 * P * P * max(w.shape[0] for w in weights) * 3),
        "structured derivatives": (f, weights, impl.STRUCTURED_DERIVATIVES, 4 * P * n_params * 2),
        "structured, weights transposed": (f_t, [w.T for w in weights],
                                           impl.STRUCTURED_DERIVATIVES, 4 * P * P * 8),
    }
    out = {}
    for name, (fn, params, implementation, mem) in runs.items():
        if mem > cap:
            out[name] = {"skipped": f"memory ~{mem / 2**30:.1f} GiB"}
            continue
        kernel_fn = nt.empirical_ntk_fn(fn, trace_axes=(), vmap_axes=0,
                                        implementation=implementation)
        t0 = time.perf_counter()
        compiled = jax.jit(kernel_fn).lower(X, None, params).compile()
        compile_s = time.perf_counter() - t0
        K = compiled(X, None, params)
        err = float(jnp.linalg.norm(K - K_ref) / jnp.linalg.norm(K_ref))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(X, None, params))
            times.append(time.perf_counter() - t0)
        mem = compiled.memory_analysis()
        peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes) / 2**20
        peak = peak or None  # this jax reports zeros on CPU: unknown, not zero
        out[name] = {"ms": 1e3 * statistics.median(times), "compile_s": compile_s,
                     "peak_mib": peak, "err": err}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
