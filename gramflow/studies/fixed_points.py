"""Fixed points of the collective flow and their stability."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
import optax.tree_utils
from jaxtyping import Array, Bool, Float, Int

from ..fields.state import parameter_gradients
from ..model.network import ReLUNet, check_inputs, parameters, with_parameters

_MAX_PARAMS = 4096  # the Jacobian of the velocity field is (n, n): small problems only


class FixedPoint(eqx.Module):
    """A stationary point of gradient flow `dθ/dt = −∇L(θ)` (η = 1), found from a given
    network, with its stability.

    **Fields:**

    - `net`: the network at the point.
    - `loss`: `½ Σ r²`; `r`: the residual `(P,)` / `(P, k)`.
    - `speed`: `‖dθ/dt‖ = ‖∇L‖ = √(rᵀ K r)` (I1, I2): zero at a fixed point.
    - `interpolating`: whether `‖r‖ ≤ r_tol · ‖y‖` (`r = 0`); a non-interpolating fixed point
      has `K r = 0` with `r ≠ 0` (its residual lies in the kernel's null space).
    - `eigenvalues`: `(n,)` eigenvalues of the Jacobian `−∇²L` of the velocity field over the
      n trained parameters, descending (real: the Jacobian is symmetric).
    - `n_unstable`, `n_zero`, `n_stable`: eigenvalues above `zero_tol · max|λ|`, within it,
      and below `−zero_tol · max|λ|`. Zero modes include the continuous symmetries of
      homogeneous networks (rescaling a unit's incoming weights by c and outgoing by 1/c).
    - `converged`: whether `speed ≤ tol` was reached; `steps`: optimizer iterations.
    """

    net: ReLUNet
    loss: Float[Array, ""]
    r: Float[Array, "P *k"]
    speed: Float[Array, ""]
    interpolating: Bool[Array, ""]
    eigenvalues: Float[Array, " n"]
    n_unstable: Int[Array, ""]
    n_zero: Int[Array, ""]
    n_stable: Int[Array, ""]
    converged: Bool[Array, ""]
    steps: Int[Array, ""]

    @property
    def stability(self) -> str:
        """`"unstable"` (some direction grows), `"stable"` (every direction decays),
        `"marginal"` (no growing direction, some zero modes), or `"not converged"` (the
        search stopped away from a fixed point, where the eigenvalues say nothing)."""
        if not bool(self.converged):
            return "not converged"
        if int(self.n_unstable) > 0:
            return "unstable"
        return "stable" if int(self.n_zero) == 0 else "marginal"

    def __str__(self) -> str:
        kind = "interpolating" if bool(self.interpolating) else "non-interpolating"
        if not bool(self.converged):
            return (f"no fixed point reached: speed {float(self.speed):.1e} after "
                    f"{int(self.steps)} steps (loss {float(self.loss):.3e}); raise max_steps, "
                    "or start closer (e.g. objective='loss' finds the flow's attractors)")
        return (f"{kind} fixed point, {self.stability}: loss {float(self.loss):.3e}, speed "
                f"{float(self.speed):.1e} ({'converged' if bool(self.converged) else 'NOT converged'}"
                f" in {int(self.steps)} steps); Jacobian eigenvalues: {int(self.n_unstable)} > 0, "
                f"{int(self.n_zero)} ≈ 0, {int(self.n_stable)} < 0")


def velocity_jacobian(net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"]):
    """The Jacobian of the gradient-flow velocity `−∇L` (η = 1) over the trained parameters,
    `(n, n)`, by forward-mode autodiff of the pullback gradients (I1). Returns
    `(jacobian, unravel)` with `unravel` mapping a flat vector to a parameter pytree."""
    X, y = check_inputs(net, X, y)
    flat, unravel = jax.flatten_util.ravel_pytree(parameters(net))
    if flat.size > _MAX_PARAMS:
        raise ValueError(f"the velocity Jacobian over {flat.size} parameters is too large for a "
                         f"dense eigendecomposition (limit {_MAX_PARAMS}); use a smaller network.")

    def velocity(v):
        g = parameter_gradients(with_parameters(net, unravel(v)), X, y)
        return -jax.flatten_util.ravel_pytree(g)[0]

    return jax.jacfwd(velocity)(flat), unravel


def fixed_point(
    net: ReLUNet,
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    tol: float | None = None,
    max_steps: int = 2000,
    r_tol: float = 1e-6,
    zero_tol: float = 1e-8,
    objective: str = "velocity",
) -> FixedPoint:
    """Find a stationary point of the collective flow starting from `net`, and classify it.

    With `objective="velocity"` (default) minimizes the squared velocity
    `½ ‖dθ/dt‖² = ½ ‖∇L‖² = ½ rᵀ K r` (I1, I2) over the trained parameters with L-BFGS
    (`optax.lbfgs`, zoom line search), from `net`, until `‖∇L‖ ≤ tol`: unlike following the
    flow, this also finds saddles and other unstable points, but it can stall at a local
    minimum of `‖∇L‖` that is not a fixed point (check `converged`). `objective="loss"`
    minimizes L itself, which finds the flow's attractors (minima) faster and more reliably.
    Then the eigenvalues of the velocity Jacobian `−∇²L` (`velocity_jacobian`) give the
    stability; everything runs in one compiled loop.

    **Arguments:** `net`; `X` `(P, d)`; `y`; `tol` (default `1e-10` for float64, `1e-5` for
    float32, times `1 + ‖∇L(net)‖`); `max_steps`; `r_tol`: relative residual below which the
    point is interpolating; `zero_tol`: relative size below which a Jacobian eigenvalue
    counts as zero.

    **Returns:** a `FixedPoint`.
    """
    X, y = check_inputs(net, X, y)
    flat0, unravel = jax.flatten_util.ravel_pytree(parameters(net))
    if flat0.size > _MAX_PARAMS:
        raise ValueError(f"fixed_point classifies stability from the dense {flat0.size}² velocity "
                         f"Jacobian (limit {_MAX_PARAMS} parameters); use a smaller network.")
    if tol is None:
        tol = 1e-10 if net.dtype == jnp.float64 else 1e-5
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"`max_steps` must be an int ≥ 0, got {max_steps!r}.")
    if objective not in ("velocity", "loss"):
        raise ValueError(f"`objective` must be 'velocity' or 'loss', got {objective!r}.")
    return _fixed_point(net, X, y, float(tol), max_steps, float(r_tol), float(zero_tol),
                        objective)


@eqx.filter_jit
def _fixed_point(net, X, y, tol, max_steps, r_tol, zero_tol, objective_name):
    flat0, unravel = jax.flatten_util.ravel_pytree(parameters(net))

    def grad_of(v):
        g = parameter_gradients(with_parameters(net, unravel(v)), X, y)
        return jax.flatten_util.ravel_pytree(g)[0]

    def objective(v):
        if objective_name == "loss":
            r = with_parameters(net, unravel(v))(X) - y
            return 0.5 * jnp.sum(r**2)
        g = grad_of(v)
        return 0.5 * jnp.sum(g**2)

    speed0 = jnp.linalg.norm(grad_of(flat0))
    scale = 1 + speed0
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def cond(carry):
        _, _, i, speed = carry
        return (i < max_steps) & (speed > tol * scale)

    def body(carry):
        v, state, i, _ = carry
        value, g = value_and_grad(v, state=state)
        updates, state = opt.update(g, state, v, value=value, grad=g, value_fn=objective)
        # The line search leaves the objective (and its gradient) at the new point in the
        # state: the speed ‖∇L‖ is read from there, not recomputed.
        if objective_name == "loss":
            speed = jnp.linalg.norm(optax.tree_utils.tree_get(state, "grad"))
        else:
            speed = jnp.sqrt(2 * optax.tree_utils.tree_get(state, "value"))
        return optax.apply_updates(v, updates), state, i + 1, speed

    init = (flat0, opt.init(flat0), jnp.asarray(0), speed0)
    v, _, steps, _ = jax.lax.while_loop(cond, body, init)
    point = with_parameters(net, unravel(v))
    jac, _ = velocity_jacobian(point, X, y)
    eig = jnp.linalg.eigvalsh(0.5 * (jac + jac.T))[::-1]
    cut = zero_tol * jnp.max(jnp.abs(eig))
    speed = jnp.linalg.norm(grad_of(v))
    r = point(X) - y
    return FixedPoint(
        net=point, loss=0.5 * jnp.sum(r**2), r=r, speed=speed,
        interpolating=jnp.linalg.norm(r) <= r_tol * jnp.linalg.norm(y),
        eigenvalues=eig, n_unstable=jnp.sum(eig > cut), n_zero=jnp.sum(jnp.abs(eig) <= cut),
        n_stable=jnp.sum(eig < -cut), converged=speed <= tol * scale, steps=steps,
    )
