"""Discrete versus continuous time (I7): one gradient-descent step against its first-order
collective prediction."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..fields.state import collective_state, parameter_gradients
from ..fields.velocities import Velocities, velocities
from ..model.network import ReLUNet, check_inputs, parameters, with_parameters
from .simulate import _check_lr


class StepRemainder(eqx.Module):
    """One GD step's change of the fields against `η ×` their gradient-flow velocities.

    **Fields:** `actual` — the changes `r' − r`, `H_l' − H_l`, `B_l' − B_l` over one step of
    `W ← W − η ∂L/∂W` (`L = ½ Σ r²`); `predicted` — `η ×` `velocities(net, X, y)` (I2, I4,
    I5); `lr` — η.
    """

    actual: Velocities
    predicted: Velocities
    lr: Float[Array, ""]

    @property
    def remainder(self) -> Velocities:
        """`actual − predicted`, O(η²) while no activation changes within the step (I7)."""
        return jax.tree.map(jnp.subtract, self.actual, self.predicted)

    def norms(self) -> dict[str, Array]:
        """Frobenius norms of the remainder: `r` scalar; `H` and `B` per layer, `(L,)`."""
        rem = self.remainder
        return {
            "r": jnp.linalg.norm(rem.r.ravel()),
            "H": jnp.stack([jnp.linalg.norm(h.ravel()) for h in rem.H]),
            "B": jnp.stack([jnp.linalg.norm(b.ravel()) for b in rem.B]),
        }


def step_remainder(
    net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"], *, lr
) -> StepRemainder:
    """One gradient-descent step with step `lr` against the first-order prediction of the
    collective flow (I7): the remainder must shrink like η² (by ≈ 4 when η halves) as long
    as no activation flips within the step.

    **Arguments:** `net`; `X` `(P, d)`; `y` `(P,)` or `(P, k)`; `lr`: η.

    **Returns:** a `StepRemainder` (`.remainder`, `.norms()`).
    """
    X, y = check_inputs(net, X, y)
    lr = _check_lr(lr, net.dtype)
    before = collective_state(net, X, y)
    grads = parameter_gradients(net, X, y)
    stepped = with_parameters(net, jax.tree.map(lambda p, g: p - lr * g, parameters(net), grads))
    after = collective_state(stepped, X, y)
    actual = Velocities(
        r=after.r - before.r,
        H=tuple(a - b for a, b in zip(after.H, before.H)),
        B=tuple(a - b for a, b in zip(after.B, before.B)),
    )
    predicted = jax.tree.map(lambda v: lr * v, velocities(net, X, y))
    return StepRemainder(actual=actual, predicted=predicted, lr=lr)
