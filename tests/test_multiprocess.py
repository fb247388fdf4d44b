"""Two processes on localhost (`jax.distributed.initialize`, CPU collectives over gloo), two CPU
devices each: the kernel products of a sample axis sharded over all four devices equal the
single-process result (float64, ≤ 1e-12) and stay sharded along samples."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-12
TIMEOUT = 300  # seconds for both processes together

WORKER = textwrap.dedent(r'''
    import functools
    import json
    import sys

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    port, rank = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=rank)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import gramflow as gf

    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    samples = NamedSharding(Mesh(np.array(jax.devices()), ("samples",)),
                            PartitionSpec("samples"))
    P, d = 64, 3
    results = {}
    for name, net in {  # (scalar outputs and more nets: the 8 devices of test_sharding.py)
        "depth3 vector": gf.ReLUNet.init(jax.random.key(1), d, (7, 11, 5), out_dim=2),
    }.items():
        shape = (P,) if net.out_dim is None else (P, net.out_dim)
        # every process draws the same global data and builds the array from its own rows
        X = np.asarray(jax.random.normal(jax.random.key(3), (P, d)))
        V = np.asarray(jax.random.normal(jax.random.key(4), (*shape, 3)))
        Xg, Vg = (jax.make_array_from_callback(a.shape, samples, lambda i, a=a: a[i])
                  for a in (X, V))
        local = jax.local_devices()[0]  # the single-device reference, in this process
        ref = np.asarray(gf.kernel_matvec(net, jax.device_put(X, local),
                                          jax.device_put(V, local)))
        # eagerly (the inputs validated on their devices) and under jit
        for label, fn, args in [
            ("matvec V eager", gf.kernel_matvec, (Xg, Vg)),
            ("matvec v", jax.jit(gf.kernel_matvec), (Xg, Vg[..., 0])),
            ("matvec V", jax.jit(gf.kernel_matvec), (Xg, Vg)),
            ("matvec V blocked", jax.jit(functools.partial(gf.kernel_matvec, block_size=8)),
             (Xg, Vg)),
        ]:
            out = fn(net, *args)
            full = multihost_utils.process_allgather(out, tiled=True)
            want = ref[..., 0] if label == "matvec v" else ref
            results[f"{name}/{label}"] = {
                "err": float(np.max(np.abs(full - want)) / np.max(np.abs(want))),
                "sharded": bool(out.sharding.is_equivalent_to(samples, out.ndim)),
                "addressable": bool(out.is_fully_addressable),
                "sharding": str(out.sharding),
            }
    print("RESULTS " + json.dumps(results), flush=True)
    jax.distributed.shutdown()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()  # 2 devices each
                                if "xla_force_host_platform_device_count" not in f)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, port, str(rank)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate() for proc in procs]
        raise AssertionError("the two processes timed out after "
                             f"{TIMEOUT} s:\n" + "\n".join(e[-3000:] for _, e in logs)) from None
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {rank} failed:\n{out[-2000:]}{err[-5000:]}"
    for rank, (out, _) in enumerate(outputs):
        line = [s for s in out.splitlines() if s.startswith("RESULTS ")][-1]
        results = json.loads(line[len("RESULTS "):])
        assert len(results) == 4
        for name, r in results.items():
            assert r["err"] <= TOL, f"process {rank}, {name}: {r['err']:.1e}"
            assert r["sharded"] and not r["addressable"], f"process {rank}, {name}: {r}"
