"""The suite's own environment: conftest.py keeps XLA:CPU's YNN fusions off on the jaxlib
releases where they crash at random (see there)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import JAXLIB, YNN_CRASHES

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# a float32 product, which XLA:CPU puts in a YNN fusion when they are on
PROGRAM = ("import jax, jax.numpy as jnp\n"
           "x = jnp.ones((16, 16), jnp.float32)\n"
           "print('__ynn_fusion' in jax.jit(lambda a, b: (a @ b).sum()).lower(x, x)"
           ".compile().as_text())")


@pytest.mark.skipif(JAXLIB not in YNN_CRASHES,
                    reason="YNN fusions are left as they are outside the affected releases")
def test_ynn_fusions_are_off_in_the_affected_jaxlibs():
    if jax.devices()[0].platform != "cpu":
        pytest.skip("a CPU compiler option")
    flags = os.environ["XLA_FLAGS"].split()  # what the subprocesses of the tests inherit
    assert [f for f in flags if f.startswith(FLAG)] == [FLAG]  # set, to nothing
    x = jnp.ones((16, 16), jnp.float32)
    assert "__ynn_fusion" not in jax.jit(lambda a, b: (a @ b).sum()).lower(x, x) \
        .compile().as_text()
    # the control: without the flag, the same program has a YNN fusion (the check can fail)
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in flags if f != FLAG))
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True", out.stdout + out.stderr
