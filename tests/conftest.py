import importlib.metadata
import itertools
import os


def _add_xla_flag(flag: str) -> None:
    """Append `--flag` to XLA_FLAGS unless the flag is set already (by the user, say)."""
    name = flag.split("=")[0]
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{flag}".strip()


# Set before jax starts its backend; the subprocesses of the tests inherit them through the
# environment. An unknown flag would abort XLA, so each is tied to the jaxlib releases that
# have it.
JAXLIB = importlib.metadata.version("jaxlib")
#: the jaxlib releases whose YNN fusions crash (tests/test_environment.py checks the flag)
YNN_CRASHES = ("0.10.2", "0.11.0")
if JAXLIB in YNN_CRASHES:
    # In these releases XLA:CPU's YNN fusions crash some programs at random, at compile or
    # asynchronously on a worker thread (jax-ml/jax#39257 and #40412, a regression from
    # 0.10.1, fixed in XLA but in no jaxlib release yet). The suite runs without them, as
    # those reports advise.
    _add_xla_flag("xla_cpu_experimental_ynn_fusion_type=")
if JAXLIB.startswith("0.10."):
    # The suite compiles over a thousand small programs that each run for milliseconds, so
    # its time is XLA's compile time: XLA's older CPU fusion emitters compile them about a
    # third faster (test_simulate + test_sgd: 124 s -> 85 s, jaxlib 0.10.2 on 2 cores), to
    # the same bits where the tests compare bit for bit (the sweep uses them for brief
    # programs, `_QUICK_OPTIONS`). Runs outside the suite keep XLA's defaults. (LLVM -O0
    # would halve the compile time again, but changes the bits of some programs.)
    _add_xla_flag("xla_cpu_use_fusion_emitters=false")

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
