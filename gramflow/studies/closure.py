"""The closure experiment: how much of the exact field dynamics each closure keeps."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._progress import progress_bar
from ..dynamics.engines import (
    Collective,
    FrozenKernel,
    FrozenOperators,
    TruncatedTransport,
    Weights,
)
from ..dynamics.sweep import sweep

#: name -> what it keeps (engines and closures, see `gramflow.Collective`). `full_transport` keeps every term of the flow but
#: steps it by Euler, so its error is what the discretization and sliding cost.
CLOSURES = {
    "layer_local": "Collective(closure=TruncatedTransport(0)): the k = l terms of (I4)/(I5) only",
    "frozen_operators": "Collective(closure=FrozenOperators()): Gram operators frozen at t = 0",
    "frozen_kernel": "FrozenKernel(): r_n = (I − ηK₀)^n r₀, the lazy / NTK limit",
    "full_transport": "Collective(closure=TruncatedTransport(L−1)): all terms, Euler steps of "
                      "the flow",
}


def closure_engine(name: str, depth: int):
    """The engine object of a named closure at depth L (`CLOSURES`)."""
    return {
        "layer_local": lambda: Collective(closure=TruncatedTransport(0)),
        "frozen_operators": lambda: Collective(closure=FrozenOperators()),
        "frozen_kernel": FrozenKernel,
        "full_transport": lambda: Collective(closure=TruncatedTransport(depth - 1)),
    }[name]()


class ClosureStudy(eqx.Module):
    """Errors of closures against the exact dynamics over a grid of depths, widths and seeds.

    **Fields:**

    - `error`: `(C, D, W, S, T)` relative residual error `‖r − r_exact‖ / ‖r_exact‖` of
      closure c at depth d, width w, seed s and record t.
    - `loss`: `(D, W, S, T)` loss of the exact dynamics.
    - `step`: `(T,)` steps of the records.
    - `closures`, `depths`, `widths`, `seeds`: the grid (static); depth = number of hidden
      layers L (weight layers including the readout: L + 1).
    """

    error: Float[Array, "C D W S T"]
    loss: Float[Array, "D W S T"]
    step: Int[Array, " T"]
    closures: tuple[str, ...] = eqx.field(static=True)
    depths: tuple[int, ...] = eqx.field(static=True)
    widths: tuple[int, ...] = eqx.field(static=True)
    seeds: tuple[int, ...] = eqx.field(static=True)

    def final(self) -> np.ndarray:
        """`(C, D, W)` errors at the last record, averaged over seeds."""
        return np.asarray(self.error[..., -1]).mean(axis=-1)


def closure_study(
    X: Float[Array, "P d"],
    y: Float[Array, " P"],
    *,
    depths: Sequence[int] = (1, 2, 3, 4),
    widths: Sequence[int] = (32, 128, 512),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    lr: float = 0.05,
    record_every: int = 20,
    parametrization: str = "ntk",
    closures: Sequence[str] = tuple(CLOSURES),
    progress: bool = True,
    exact_loss: bool = True,
) -> ClosureStudy:
    """Run each closure against the exact dynamics (the weights engine in the same scan) for
    every depth, width and seed, through `sweep` (widths and seeds in one `jax.vmap` per
    depth and closure). Hidden layers all have the given width; gradient descent on
    `½ Σ r²` with step `lr`.

    What the theory says (I3)–(I5): with one hidden layer every field closure is
    exact and only the frozen kernel errs; from two hidden layers on, dropping transport errs;
    the frozen variants improve with width. This measures it. `exact_loss=False` skips the
    extra run that records the exact loss (`loss` is then NaN).
    """
    unknown = [c for c in closures if c not in CLOSURES]
    if unknown:
        raise ValueError(f"unknown closure(s) {unknown}; choose from {list(CLOSURES)}.")
    bar = progress_bar(len(depths) * (len(closures) + exact_loss), progress, desc="closure runs")
    errors, losses, step = [], [], None
    for L in depths:
        grid = dict(widths=widths, depths=(L,), seeds=seeds, lrs=(lr,), steps=steps,
                    record_every=record_every, parametrization=parametrization,
                    observables=("loss",), progress=False)
        per_closure = []
        for name in closures:
            res = sweep(X, y, reference=Weights(), engine=closure_engine(name, L), **grid)
            per_closure.append(np.asarray(res.observables["closure_error"])[0, :, :, 0])
            bar.update(1)
        errors.append(np.stack(per_closure))
        step = res.step
        if exact_loss:
            losses.append(np.asarray(sweep(X, y, **grid).loss)[0, :, :, 0])
            bar.update(1)
        else:
            losses.append(np.full(per_closure[0].shape, np.nan))
    bar.close()
    return ClosureStudy(
        error=jnp.asarray(np.stack(errors, axis=1)),
        loss=jnp.asarray(np.stack(losses)),
        step=jnp.asarray(step),
        closures=tuple(closures),
        depths=tuple(depths),
        widths=tuple(widths),
        seeds=tuple(seeds),
    )
