"""Every benchmark runs at a tiny size, checking agreement before it times anything."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_run_all_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("kernel", "simulate", "sweep", "closure", "structure", "limits", "scale"):
        assert f"=== {name}:" in proc.stdout
    assert "(machine) matmul GFLOP/s" in proc.stdout and "vs weights" in proc.stdout
    assert "jacrev/masked" in proc.stdout and "robust_weight_kernel" in proc.stdout
    assert "lazy predictions vs frozen-kernel engine" in proc.stdout
    assert "log-log slope vs width" in proc.stdout
    assert "eigenvalues vs dense eigh" in proc.stdout and "SGD step cost" in proc.stdout
