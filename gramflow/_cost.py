"""Crossover points between exact forms of one computation: documented, overridable, per backend."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Where gramflow switches between two exact ways of computing the same kernel.

    Every choice below changes speed only, never the result (the forms agree to round-off).
    The defaults were measured on a 2-core x86-64 CPU (`benchmarks/kernel.py`,
    `benchmarks/structure.py` print the timings they come from); a GPU or another CPU will
    have other crossover points — measure with those scripts and pass your own
    `CostModel(...)` as `cost=` to `collective_kernel` / `layer_kernels`.

    **Fields:**

    - `triangle_block`: block size of the block-triangular form of `collective_kernel`
      (K from its upper block triangle, about half the Gram products).
    - `triangle_min_width`: the triangular form is used when P spans at least two blocks and
      the mean width of the Gram products, `mean_l (N_{l-1} + N_l)`, is at least this (on the
      reference CPU it paid off at widths 3 × 1024 and lost at 3 × 256, P = 2048).
    - `biclique_gram`, `biclique_overhead`, `chunked_overhead`: cost of one biclique of a
      masked layer in units of one connection (P² flops of a large matrix product):
      `biclique_gram · (|R| + |C|)` for its Grams plus a fixed overhead for its `(P, P)`
      temporaries (`chunked_overhead` beyond `unrolled_bicliques` bicliques). The masked
      kernel takes the Hadamard-of-block-Grams form when this is cheaper than one column per
      connection (`masked_kernel`).
    - `unrolled_bicliques`: up to this many bicliques, one static product each; beyond, a
      chunked loop.
    - `chunk_elements`: bound on the intermediates of a masked kernel, in elements.
    """

    triangle_block: int = 512
    triangle_min_width: float = 1000.0
    biclique_gram: float = 0.8
    biclique_overhead: float = 130.0
    chunked_overhead: float = 220.0
    unrolled_bicliques: int = 32
    chunk_elements: int = 2**24

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"CostModel.{f.name} must be a number ≥ 0, got {value!r}.")
        for name in ("triangle_block", "chunk_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"CostModel.{name} must be ≥ 1, got {getattr(self, name)!r}.")

    @classmethod
    def default(cls, backend: str | None = None) -> CostModel:
        """The defaults for a backend (`None`: JAX's default backend). Only the CPU values
        are measured; other backends get the same numbers until someone measures them."""
        backend = jax.default_backend() if backend is None else backend
        return _DEFAULTS.get(backend, cls())


_DEFAULTS = {"cpu": CostModel()}
