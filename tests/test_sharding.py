"""The sample axis sharded over 8 simulated CPU devices: fields, kernel products, eigenpairs,
the tiled kernel and simulate runs (gradient descent and mini-batch SGD, every engine) equal
the single-device results (float64, ≤ 1e-12) and come back sharded along samples like the
inputs, never gathered onto one device. A sweep whose configurations are split over the 8
devices equals simulate on one device.

The device count must be set before jax is imported, so every check runs in one python
subprocess (one compilation budget) that prints its measurements as JSON; this file judges
them."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-12

SCRIPT = textwrap.dedent(r'''
    import json
    import functools
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jax.config.update("jax_enable_x64", True)
    import gramflow as gf

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("samples",))
    samples = NamedSharding(mesh, PartitionSpec("samples"))
    P, d = 96, 3
    results = {}

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    by_columns = NamedSharding(mesh, PartitionSpec(None, "samples"))

    def record(name, sharded, single, err=None, columns=False):
        s = sharded.sharding  # a kernel (P, P, ...) may be sharded along either sample axis
        results[name] = {
            "err": rel(sharded, single) if err is None else err,
            "sharded": bool(s.is_equivalent_to(samples, sharded.ndim)
                            or (columns and s.is_equivalent_to(by_columns, sharded.ndim))),
            "sharding": str(getattr(s, "spec", s)),
        }

    nets = {
        "depth3 vector": gf.ReLUNet.init(jax.random.key(1), d, (7, 11, 5), out_dim=2),
        "structured": gf.ReLUNet.init(
            jax.random.key(3), d, (8, 8), masks=[None, gf.Mask.block_diagonal((8, 8), 2)],
            gains=1.3, skips=0.5, train=("weights", "gains", "skips")),
    }
    X = jax.random.normal(jax.random.key(4), (P, d))
    Xs = jax.device_put(X, samples)
    for name, net in nets.items():
        shape = (P,) if net.out_dim is None else (P, net.out_dim)
        y = jax.random.normal(jax.random.key(5), shape)
        v = jax.random.normal(jax.random.key(6), shape)
        V = jax.random.normal(jax.random.key(7), (*shape, 3))
        ys, vs, Vs = (jax.device_put(a, samples) for a in (y, v, V))

        one, many = gf.collective_state(net, X, y), gf.collective_state(net, Xs, ys)
        for field in ("H", "Z", "D", "B", "Delta"):
            for l, (a, b) in enumerate(zip(getattr(many, field), getattr(one, field))):
                record(f"{name}/state.{field}[{l}]", a, b)
        record(f"{name}/state.f", many.f, one.f)
        record(f"{name}/state.r", many.r, one.r)

        record(f"{name}/matvec v", gf.kernel_matvec(net, Xs, vs), gf.kernel_matvec(net, X, v))
        record(f"{name}/matvec V", gf.kernel_matvec(net, Xs, Vs), gf.kernel_matvec(net, X, V))
        # P = 12 blocks of 8 samples: the sample-blocked products (every 12th sample a block)
        record(f"{name}/matvec V blocked", gf.kernel_matvec(net, Xs, Vs, block_size=8),
               gf.kernel_matvec(net, X, V))
        if name == "structured":  # the other ways of blocking, on the net with every part
            # 10 blocks of 10 samples, 4 of them padding
            record(f"{name}/matvec V padded blocks",
                   gf.kernel_matvec(net, Xs, Vs, block_size=10), gf.kernel_matvec(net, X, V))
            # the automatic choice of blocks (a divisor of P), forced at this size; a new
            # shape of V (2 columns) so that the compiled product is traced again
            gf.model.layer.MATMAT_BLOCK_ELEMENTS = 64
            record(f"{name}/matvec V auto-blocked", gf.kernel_matvec(net, Xs, Vs[..., :2]),
                   gf.kernel_matvec(net, X, V)[..., :2])
            gf.model.layer.MATMAT_BLOCK_ELEMENTS = 2**23
            jitted = jax.jit(functools.partial(gf.kernel_matvec, block_size=8))
            record(f"{name}/matvec V blocked under jit", jitted(net, Xs, Vs),
                   gf.kernel_matvec(net, X, V))

        a, b = gf.kernel_eigs(net, Xs, k=3, iters=4), gf.kernel_eigs(net, X, k=3, iters=4)
        assert int(a.iterations) == 4  # the Krylov path, not the dense fallback
        U, W = (np.asarray(e.vectors).reshape(-1, 3) for e in (a, b))
        results[f"{name}/eigs values"] = {"err": rel(a.values, b.values), "sharded": True}
        record(f"{name}/eigs vectors", a.vectors, b.vectors, err=rel(U @ U.T, W @ W.T))
        results[f"{name}/eigs residuals"] = {"err": 0.0, "sharded": True,
                                             "max": float(np.max(np.asarray(b.residuals)))}
        a, b = gf.kernel_eigs(net, Xs, k=3), gf.kernel_eigs(net, X, k=3)
        assert int(a.iterations) == 0  # the dense fallback
        U, W = (np.asarray(e.vectors).reshape(-1, 3) for e in (a, b))
        results[f"{name}/eigs dense values"] = {"err": rel(a.values, b.values), "sharded": True}
        record(f"{name}/eigs dense vectors", a.vectors, b.vectors, err=rel(U @ U.T, W @ W.T))

        record(f"{name}/collective_kernel", gf.collective_kernel(net, Xs),
               gf.collective_kernel(net, X), columns=True)
        record(f"{name}/collective_kernel tiled", gf.collective_kernel(net, Xs, block_size=16),
               gf.collective_kernel(net, X), columns=True)

        # simulate: gradient descent and mini-batch SGD in each engine (on the structured
        # net; the weights' GD and the collective SGD on the other); the records (T, P, ...)
        # sharded along their sample axis
        runs = [(e, sgd) for e in (gf.Weights(), gf.Collective(), gf.FrozenKernel())
                for sgd in ({}, {"batch_size": 24, "key": jax.random.key(8)})]
        if name != "structured":  # the weights' GD and the collective SGD
            runs = runs[0:1] + runs[3:4]
        for engine, sgd in runs:
            kw = dict(steps=30, lr=0.02, engine=engine, record_every=10, **sgd)
            a, b = gf.simulate(net, Xs, ys, **kw), gf.simulate(net, X, y, **kw)
            what = f"{name}/simulate {type(engine).__name__}{' SGD' if sgd else ''}"
            record(what + " r", a.r, b.r, columns=True)
            results[what + " loss"] = {"err": rel(a.loss, b.loss), "sharded": True}

    # sweep: a grid whose configurations are split over the 8 devices (in chunks of
    # max_bytes) equals simulate on one device, configuration by configuration
    X, y = gf.teacher_student(jax.random.key(9), samples=10, in_dim=4)
    res = gf.sweep(X, y, widths=(3, 6), depths=(1, 2), seeds=(0, 1, 2), lrs=(0.05, 0.1),
                   steps=12, record_every=4, progress=False, max_bytes=400_000,
                   batch_sizes=(None, 4))
    for i, j, s, k, b in ((0, 0, 0, 0, None), (0, 1, 2, 1, 4), (1, 0, 1, 1, 4),
                          (1, 1, 2, 0, None)):  # (depth, width, seed, lr, batch size)
        L, w, lr = (1, 2)[i], (3, 6)[j], (0.05, 0.1)[k]
        sgd = {} if b is None else {"batch_size": b, "key": gf.batch_key(s)}
        run = gf.simulate(gf.ReLUNet.init(jax.random.key(s), 4, (w,) * L), X, y, steps=12,
                          lr=lr, record_every=4, **sgd)
        at = (i, j, s, k, int(b is not None))
        # ("sharded": the sweep's results are host arrays; that its configurations really
        # ran split over the devices is not observed here, only that the split changes
        # nothing)
        results[f"sweep depth {L} width {w} seed {s} lr {lr} B {b}"] = {
            "err": max(rel(res.observables["r"][at], run.r), rel(res.loss[at], run.loss)),
            "sharded": True}
    print("RESULTS " + json.dumps(results))
''')

def _run():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["JAX_ENABLE_X64"] = "1"
    env.pop("JAX_PLATFORMS", None)
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                             timeout=600, env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the 8-device subprocess timed out:\n{err.stderr}") from err
    assert out.returncode == 0, ("the 8-device subprocess failed:\n" + out.stdout[-3000:]
                                 + out.stderr[-6000:])
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def test_sharded_equals_single_device():
    """One test (one subprocess, also under pytest-xdist) for every check."""
    results = _run()
    assert len(results) > 50
    wrong = [f"{name}: {r['err']:.1e}" for name, r in results.items() if not r["err"] <= TOL]
    assert wrong == [], "sharded differs from one device:\n" + "\n".join(wrong)
    gathered = [f"{name}: {r['sharding']}" for name, r in results.items() if not r["sharded"]]
    assert gathered == [], "not sharded along samples:\n" + "\n".join(gathered)
    converged = {name: r["max"] for name, r in results.items() if "residuals" in name}
    assert max(converged.values()) < 1e-3, converged  # the compared pairs are eigenpairs
