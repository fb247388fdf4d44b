"""The suite's own environment: conftest.py keeps XLA:CPU's YNN fusions off on the jaxlib
releases where they crash at random (see there)."""

import importlib.metadata
import os

import jax
import jax.numpy as jnp
import pytest


@pytest.mark.skipif(importlib.metadata.version("jaxlib") not in ("0.10.2", "0.11.0"),
                    reason="YNN fusions are left as they are outside the affected releases")
def test_ynn_fusions_are_off_in_the_affected_jaxlibs():
    if jax.devices()[0].platform != "cpu":
        pytest.skip("a CPU compiler option")
    assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]  # subprocesses
    x = jnp.ones((16, 16))
    hlo = jax.jit(lambda a, b: a @ b).lower(x, x).compile().as_text()
    assert "__ynn_fusion" not in hlo  # (as the kind of a fusion, when on)
