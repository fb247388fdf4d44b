import importlib.metadata
import itertools
import os

# jaxlib 0.10.2 to 0.11.0 turn on XLA:CPU's YNN fusions, which crash at random in some
# programs, at compile or asynchronously on a worker thread (jax-ml/jax#39257 and #40412,
# fixed upstream after 0.11.0). The suite runs without them, as those reports advise; the
# flag reaches the subprocesses of the tests through the environment. Set before jax starts.
if importlib.metadata.version("jaxlib") in ("0.10.2", "0.11.0") and \
        "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_experimental_ynn_fusion_type=").strip()

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """`getkey()` returns a fresh PRNG key each call, deterministic per test."""
    counter = itertools.count()
    base = jax.random.key(0)
    return lambda: jax.random.fold_in(base, next(counter))
