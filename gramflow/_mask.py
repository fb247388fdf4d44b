"""Fixed binary connectivity patterns ("constrained pathways") for structured layers."""

from __future__ import annotations

import hashlib

import jax
import numpy as np


class Mask:
    """A fixed binary connectivity mask `M_l` of shape `(N_l, N_{l-1})`: the layer's effective
    weights are `W_l ⊙ M_l`.

    Hashable and immutable, so it is a static part of a `ReLUNet` (the pattern is
    configuration, not data: it is never traced or trained). Build one from any 0/1 array,
    or with `Mask.block_diagonal`, `Mask.banded`, `Mask.random`.

    `bicliques` decomposes the pattern into complete bipartite blocks `(rows R_b, cols C_b)`
    with disjoint supports, `M = Σ_b 1_{R_b} 1_{C_b}ᵀ`, so that the layer kernel is a sum of
    Hadamard products of block Grams (no per-weight Jacobian):

        K_l = s_l² Σ_b (Δ_{l,R_b} Δ_{l,R_b}ᵀ) ⊙ (Z_{l-1,C_b} Z_{l-1,C_b}ᵀ),

    at cost O(P² Σ_b (|R_b| + |C_b|)): a block-diagonal mask with G blocks costs what a dense
    layer costs, a banded one O(P² N_l (1 + band)), a random one O(P² (N_l + nnz)).
    """

    __slots__ = ("shape", "_bits", "_array", "_bicliques")

    def __init__(self, array):
        if isinstance(array, jax.core.Tracer):
            raise TypeError(
                "a Mask is static configuration and needs a concrete array; build masks outside "
                "`jax.jit` / `jax.vmap` (e.g. with Mask.random(shape, density, seed=...))."
            )
        a = np.asarray(array)
        if a.ndim != 2:
            raise ValueError(f"a Mask must be 2-D of shape (N_l, N_(l-1)), got shape {a.shape}.")
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(
                "a Mask must hold only 0 and 1 (a binary connectivity pattern); "
                "for weighted connectivity use per-layer gains or the weights themselves."
            )
        a = a.astype(bool)
        self.shape = tuple(int(n) for n in a.shape)
        self._bits = np.packbits(a, axis=None).tobytes()
        self._array = a
        self._array.setflags(write=False)
        self._bicliques = None

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def block_diagonal(cls, shape, blocks: int) -> Mask:
        """`blocks` disjoint pathways: unit i of the layer reads only inputs of its own block
        (rows and columns split into `blocks` near-equal contiguous groups)."""
        n_out, n_in = _shape(shape)
        if not isinstance(blocks, int) or not 1 <= blocks <= min(n_out, n_in):
            raise ValueError(f"`blocks` must be an int in [1, {min(n_out, n_in)}], got {blocks!r}.")
        rows = np.arange(n_out) * blocks // n_out
        cols = np.arange(n_in) * blocks // n_in
        return cls(rows[:, None] == cols[None, :])

    @classmethod
    def banded(cls, shape, bandwidth: int) -> Mask:
        """Local connectivity. Units and inputs are placed on one axis of length
        `n = max(N_out, N_in)`, unit i at `u_i = (i + ½) n / N_out` and input j at
        `v_j = (j + ½) n / N_in`; unit i reads input j when

            |u_i − v_j| ≤ bandwidth + ½   or   j = ⌊(i + ½) N_in / N_out⌋,

        the second term being the input nearest to unit i, so that no unit is cut off (on a
        layer taller than wide, the band alone misses units). For a square layer both reduce
        to `|i − j| ≤ bandwidth`."""
        n_out, n_in = _shape(shape)
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
            raise ValueError(f"`bandwidth` must be an int ≥ 0, got {bandwidth!r}.")
        n = max(n_out, n_in)
        pos_out = (np.arange(n_out) + 0.5) * n / n_out
        pos_in = (np.arange(n_in) + 0.5) * n / n_in
        a = np.abs(pos_out[:, None] - pos_in[None, :]) <= bandwidth + 0.5
        nearest = (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)  # ⌊(i + ½) N_in / N_out⌋
        a[np.arange(n_out), nearest] = True
        return cls(a)

    @classmethod
    def random(cls, shape, density: float, seed: int = 0) -> Mask:
        """Random sparse connectivity: each connection kept with probability `density`, and
        every unit keeps at least one input (so no unit is cut off)."""
        n_out, n_in = _shape(shape)
        if not 0 < density <= 1:
            raise ValueError(f"`density` must be in (0, 1], got {density!r}.")
        rng = np.random.default_rng(seed)
        a = rng.random((n_out, n_in)) < density
        a[np.arange(n_out), rng.integers(0, n_in, n_out)] = True
        return cls(a)

    # -- views --------------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The pattern as a read-only boolean NumPy array."""
        return self._array

    @property
    def density(self) -> float:
        return float(self._array.mean())

    @property
    def fan_in(self) -> float:
        """Mean number of inputs per unit (the fan-in the scales use), at least 1."""
        return max(1.0, float(self._array.sum(axis=1).mean()))

    @property
    def bicliques(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Disjoint complete blocks `(rows, cols)` covering the pattern: units with identical
        rows grouped together, or inputs with identical columns, whichever gives the cheaper
        kernel (Σ_b |R_b| + |C_b|)."""
        if self._bicliques is None:
            by_rows = _group(self._array)
            by_cols = tuple((r, c) for c, r in _group(self._array.T))
            cost = lambda bs: sum(len(r) + len(c) for r, c in bs)  # noqa: E731
            self._bicliques = by_rows if cost(by_rows) <= cost(by_cols) else by_cols
        return self._bicliques

    def __eq__(self, other):
        return isinstance(other, Mask) and (self.shape, self._bits) == (other.shape, other._bits)

    def __hash__(self):
        return hash((self.shape, self._bits))

    def digest(self) -> str:
        """A stable hex digest (SHA-256) of the shape and the pattern: equal for equal masks in
        every process, unlike `hash()`, so it can fingerprint results on disk."""
        return hashlib.sha256(repr(self.shape).encode() + self._bits).hexdigest()

    def __repr__(self):
        return f"Mask(shape={self.shape}, density={self.density:.3f}, blocks={len(self.bicliques)})"

    def padded(self, shape) -> Mask:
        """The pattern zero-padded to a larger `shape` (for width sweeps)."""
        a = np.zeros(_shape(shape), bool)
        a[: self.shape[0], : self.shape[1]] = self._array
        return Mask(a)


def _shape(shape):
    try:
        n_out, n_in = (int(n) for n in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`shape` must be a pair (N_l, N_(l-1)), got {shape!r}.") from err
    if n_out <= 0 or n_in <= 0:
        raise ValueError(f"`shape` must be positive, got {shape!r}.")
    return n_out, n_in


def _group(a: np.ndarray):
    """Rows of `a` grouped by identical pattern: `(row indices, column support)` per group."""
    if a.shape[0] == 0:
        return ()
    patterns, inverse = np.unique(a, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = []
    for g, pattern in enumerate(patterns):
        cols = np.flatnonzero(pattern)
        if cols.size:
            out.append((np.flatnonzero(inverse == g), cols))
    return tuple(out)
