"""Run every benchmark: `python benchmarks/run_all.py --quick` runs each at a tiny size (CI)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("kernel", "simulate", "sweep", "closure", "structure")


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
    for name in BENCHMARKS:
        print(f"\n=== benchmarks/{name}.py{' --quick' if args.quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        _load(name).main(["--quick"] if args.quick else [])
        print(f"=== {name}: {time.perf_counter() - t0:.1f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
