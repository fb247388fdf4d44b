"""Forward fields, conjugate fields and the pullback recursion (I1)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._algebra import apply_mask
from ..model.network import ReLUNet, check_inputs, forward, from_layer_params


class CollectiveState(eqx.Module):
    """Fields of a network on the training set, layer index l = 1..L.

    **Fields:**

    - `H`: tuple of forward fields `H_l = Z_{l-1} W̃_lᵀ` (`s_l Z_{l-1} W_lᵀ` for a dense
      layer), shape `(P, N_l)`.
    - `Z`: tuple `(Z_0 = X, Z_1, ..., Z_L)`, `Z_l = relu(H_l)`, shape `(P, N_l)` (L+1 entries).
    - `D`: tuple of activation masks `D_l = step(H_l)` (relu'(0) = 0), shape `(P, N_l)`.
    - `B`: tuple of conjugate fields `B_l = ∂f/∂Z_l`, shape `(P, N_l)` or `(P, k, N_l)`.
    - `Delta`: tuple of masked conjugate fields `Δ_l = D_l ⊙ B_l = ∂f/∂H_l`, same shapes as `B`.
    - `f`: network output, `(P,)` or `(P, k)`.
    - `r`: residual `f − y`, same shape as `f`.
    """

    H: tuple[Float[Array, "P N"], ...]
    Z: tuple[Float[Array, "P N"], ...]
    D: tuple[Float[Array, "P N"], ...]
    B: tuple[Float[Array, "P *k N"], ...]
    Delta: tuple[Float[Array, "P *k N"], ...]
    f: Float[Array, "P *k"]
    r: Float[Array, "P *k"]

    @property
    def loss(self) -> Float[Array, ""]:
        """Sum-reduced quadratic loss `½ Σ r²`."""
        return 0.5 * jnp.sum(self.r**2)


def masks(H) -> tuple[Float[Array, "P N"], ...]:
    """Activation masks `D_l = step(H_l)`, with step(0) = 0 as relu'(0) = 0 in JAX."""
    return tuple((h > 0).astype(h.dtype) for h in H)


def output_field(net: ReLUNet, P: int | Array) -> Float[Array, "P *k N_L"]:
    """Top conjugate field `B_L = s_out a`, broadcast to `(P, N_L)` or `(P, k, N_L)`; `P` is
    the number of samples, or an array whose first axis is the samples (then `B_L` is
    placed like its rows, e.g. sharded along them)."""
    a = net.scales[-1] * net.readout
    a = a if a.ndim == 1 else a.T
    if isinstance(P, int):
        return jnp.broadcast_to(a, (P,) + a.shape)
    ones = jnp.ones_like(P[:, :1], dtype=a.dtype)  # (P, 1), on P's devices
    return ones.reshape((-1,) + (1,) * a.ndim) * a[None]


def pullback(weights, D, top: Float[Array, "P *k N_L"]):
    """Backward pullback recursion (I1): `Δ_l = D_l ⊙ B_l`, `B_{l-1} = Δ_l W̃_l`.

    Linear in the top field, so it serves both the conjugate fields (`top = B_L = s_out a`)
    and the residual-weighted fields `E_l` of (I8) (`top = s_out r aᵀ`).

    **Arguments:** `weights`: effective weights `W̃_1..W̃_L` (only `W̃_2..W̃_L` are used, so
    the first entry may be `None`); `D`: masks `D_1..D_L`; `top`: `B_L` of shape `(P, N_L)` or
    `(P, k, N_L)`.

    **Returns:** tuples `(B_1..B_L, Δ_1..Δ_L)`, each entry shaped like `top` with `N_l` units.
    """
    B, Delta = [top], []
    for l in range(len(D) - 1, -1, -1):
        Delta.append(apply_mask(D[l], B[-1]))
        if l > 0:
            B.append(Delta[-1] @ weights[l])
    return tuple(reversed(B)), tuple(reversed(Delta))


def effective_weights(net: ReLUNet) -> tuple:
    """`W̃_1..W̃_L`."""
    return tuple(layer.effective() for layer in net.layers)


def fields(net: ReLUNet, X: Float[Array, "P d"]):
    """One forward and one backward pass, no validation. Returns `(H, Z, D, B, Delta, f)`."""
    H, Z, f = forward(net, X)
    D = masks(H)
    B, Delta = pullback(effective_weights(net), D, output_field(net, X))
    return H, Z, D, B, Delta, f


def collective_state(
    net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"]
) -> CollectiveState:
    """All fields of `net` on the training set: one forward pass and one pullback pass (I1).

    **Arguments:**

    - `net`: a `ReLUNet` with L hidden layers.
    - `X`: inputs, shape `(P, d)`.
    - `y`: targets, shape `(P,)` for a scalar-output network or `(P, k)` for `out_dim = k`.

    **Returns:** a `CollectiveState` with `H`, `Z` (`Z_0 = X` first), `D`, `B`, `Delta`, `f`,
    `r = f − y`. For vector outputs `B_l` and `Δ_l` carry the output axis: `(P, k, N_l)`,
    `Δ_l[μ, i] = ∂f_{μ,i}/∂h_{l,μ}`.
    """
    X, y = check_inputs(net, X, y)
    H, Z, D, B, Delta, f = fields(net, X)
    return CollectiveState(H=H, Z=Z, D=D, B=B, Delta=Delta, f=f, r=f - y)


def residual_top(net: ReLUNet, r: Float[Array, "P *k"]) -> Float[Array, "P N_L"]:
    """Residual-weighted top field `E_L`-before-masking: `s_out r aᵀ`, shape `(P, N_L)`."""
    a = net.scales[-1] * net.readout
    return r[:, None] * a[None, :] if a.ndim == 1 else r @ a.T


def residual_fields(net: ReLUNet, X, y):
    """`(Z, E)`: the forward fields and the residual-weighted conjugate fields
    `E_l = Σ_i r_i Δ_l[i]`, by one forward pass and one pullback from `s_out r aᵀ`."""
    H, Z, f = forward(net, X)
    _, E = pullback(effective_weights(net), masks(H), residual_top(net, f - y))
    return Z, E


def layer_gradients(net: ReLUNet, Z, E) -> tuple:
    """Per-layer `LayerParams` of `∂L/∂θ_l` (I1) from the fields."""
    return tuple(layer.gradients(e, z) for layer, e, z in zip(net.layers, E, Z))


def pullback_gradients(
    net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"]
) -> tuple[Float[Array, "N_l N_lm1"], ...]:
    """Gradients of the sum-reduced loss `L = ½ Σ_μ r_μ²` by the pullback recursion (I1).

    `∂L/∂W_l = s_l E_lᵀ Z_{l-1}` with the residual-weighted conjugate field
    `E_l = Σ_i r_{·,i} Δ_l[·, i]` (`diag(r) Δ_l` for scalar output), obtained by running the
    pullback recursion once from the top field `s_out r aᵀ` (it is linear in that field).
    With this loss a learning rate η means `W ← W − η ∂L/∂W`; a mean-reduced loss would
    divide η by P. For a structured layer these are the gradients of its raw weights,
    `g_l s_l M_l ⊙ (E_lᵀ Z_{l-1})` (zero off the mask); `parameter_gradients` adds those of
    the gains and skip strengths.

    **Arguments:** `net`; `X` of shape `(P, d)`; `y` of shape `(P,)` or `(P, k)`.

    **Returns:** tuple of `∂L/∂W_l`, shaped like `net.weights`.
    """
    X, y = check_inputs(net, X, y)
    Z, E = residual_fields(net, X, y)
    return tuple(layer.coefficient * layer.masked(e.T @ z)
                 for layer, e, z in zip(net.layers, E, Z))


def parameter_gradients(net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"]) -> ReLUNet:
    """Gradients of `L = ½ Σ_μ r_μ²` with respect to every trained parameter, by the pullback
    recursion (I1) with the effective weights (`Layer.gradients`):

        ∂L/∂W_l = g_l s_l M_l ⊙ F_l,   ∂L/∂g_l = s_l Σ (W_l ⊙ M_l) ⊙ F_l,   ∂L/∂α_l = tr F_l,

    with `F_l = E_lᵀ Z_{l-1}` `(N_l, N_{l-1})`. Masked-out weights get exactly zero gradient.

    **Returns:** a `ReLUNet`-shaped pytree holding the gradients in the trained leaves and
    `None` elsewhere (the layout of `eqx.filter(net, ...)`), so `jax.tree.map` combines it
    with the network's own trained leaves.
    """
    X, y = check_inputs(net, X, y)
    Z, E = residual_fields(net, X, y)
    return from_layer_params(net, layer_gradients(net, Z, E))
