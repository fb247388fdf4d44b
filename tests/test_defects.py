"""Regression tests for `Mask` (banded connectivity, stable digest)."""

import subprocess
import sys

import numpy as np
import pytest

from gramflow import Mask

SHAPES = [(n_out, n_in) for n_out in (1, 2, 3, 5, 8, 13, 40) for n_in in (1, 2, 3, 5, 8, 13, 40)]


@pytest.mark.parametrize("bandwidth", [0, 1, 2, 5])
def test_banded_keeps_an_input_for_every_unit_and_follows_its_formula(bandwidth):
    for n_out, n_in in SHAPES:
        a = Mask.banded((n_out, n_in), bandwidth).array
        assert a.any(axis=1).all(), (n_out, n_in, bandwidth)  # no unit cut off
        n = max(n_out, n_in)  # the docstring's formula
        u = (np.arange(n_out)[:, None] + 0.5) * n / n_out
        v = (np.arange(n_in)[None, :] + 0.5) * n / n_in
        nearest = np.arange(n_in)[None, :] == np.floor(
            (np.arange(n_out)[:, None] + 0.5) * n_in / n_out)
        assert np.array_equal(a, (np.abs(u - v) <= bandwidth + 0.5) | nearest)
        if n_out == n_in:  # the square case: |i − j| ≤ bandwidth, as before
            i, j = np.indices(a.shape)
            assert np.array_equal(a, np.abs(i - j) <= bandwidth)


def test_digest_is_stable_and_sees_the_pattern():
    eye, flipped = Mask(np.eye(4)), Mask(np.eye(4)[::-1])
    assert repr(eye) == repr(flipped) and eye.digest() != flipped.digest()
    assert eye.digest() == Mask(np.eye(4, dtype=bool)).digest()
    assert Mask(np.ones((2, 3))).digest() != Mask(np.ones((3, 2))).digest()  # same bits
    code = "import numpy as np; from gramflow import Mask; print(Mask(np.eye(4)).digest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=120).stdout.strip()
    assert other == eye.digest()  # not Python's salted hash(): equal in another process
