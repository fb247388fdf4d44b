"""Run every benchmark: `python benchmarks/run_all.py --quick` runs each at a tiny size (CI)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("kernel", "simulate", "sweep", "closure", "structure", "limits", "scale")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"gramflow_bench_{name}",
                                                  os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    # NumPy's LAPACK (OpenBLAS) computes only reference values here (dense spectra, checks);
    # its threads spin beside XLA's on a busy machine, where a 512 × 512 `eigvalsh` took
    # seconds instead of milliseconds. One thread; set before NumPy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if args.quick and "fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
        # At tiny sizes every benchmark is compile time: XLA's older CPU emitters compile
        # about a third faster (as the sweep does for brief programs, `_QUICK_OPTIONS`).
        # The timings of --quick mean nothing; its agreement checks, same tolerances, run.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_use_fusion_emitters=false").strip()
    for name in BENCHMARKS:
        print(f"\n=== benchmarks/{name}.py{' --quick' if args.quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        _load(name).main(["--quick"] if args.quick else [])
        print(f"=== {name}: {time.perf_counter() - t0:.1f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
