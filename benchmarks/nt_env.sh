#!/usr/bin/env bash
# Create benchmarks/.nt-venv: neural-tangents 0.6.5 with the jax it still imports with
# (current jax removed `jax.core.Jaxpr`, which it needs). benchmarks/kernel.py calls it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .nt-venv
.nt-venv/bin/pip install --quiet "jax==0.4.23" "jaxlib==0.4.23" "neural-tangents==0.6.5" \
    "numpy<2" "scipy<1.13"
.nt-venv/bin/python -c "import neural_tangents, jax; print('neural-tangents', neural_tangents.__version__, 'jax', jax.__version__)"
