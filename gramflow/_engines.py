"""Simulation engines: what is carried, how one step advances it, and its time derivative.

Each engine is an `eqx.Module` holding the constants of the problem, with

- `init()`: the carried state at t = 0;
- `step(state, lr)`: one gradient-descent step, returning `(new_state, loss_before)`;
- `rate(state, lr)`: the gradient-flow time derivative of the state (for diffrax);
- `view(state)`: the fields observables read (`_observables.View`);
- `final(state)`: what a `Trajectory` returns as its final state.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from ._kernels import collective_kernel, gram_apply
from ._network import ReLUNet
from ._observables import View, flat_kernel
from ._state import (
    apply_mask,
    fields,
    forward,
    masks,
    output_field,
    pullback,
    residual_weighted,
)
from ._velocities import rates

ENGINES = ("weights", "collective", "frozen_kernel")


class FieldState(eqx.Module):
    """State carried by the collective engine.

    **Fields:**

    - `H`: forward fields `H_1..H_L`, each `(P, N_l)`.
    - `B`: conjugate fields `B_1..B_{L-1}`, each `(P, N_l)` or `(P, k, N_l)`
      (`B_L = s_out a` is constant and not carried). In continuous time `()`: `B_{l-1} =
      s_l (D_l ⊙ B_l) W_l` jumps whenever an activation of layer l flips, which its
      velocity (I5) cannot see, so the flow reads B off the pullback recursion (I1) with
      the carried generators instead of integrating it.
    - `r`: residual `(P,)` / `(P, k)`, `s_out relu(H_L) a − y`; `None` in continuous time,
      where it is read off `H_L` whenever needed.
    - `weights`: `W_2..W_L`, the generators of the Gram operators (I4, I5). `W_1` never
      enters the field dynamics, so for one hidden layer this is `()`: the engine is
      weight-free (I3).
    """

    H: tuple[Float[Array, "P N"], ...]
    B: tuple[Float[Array, "P *k N"], ...]
    r: Float[Array, "P *k"] | None
    weights: tuple[Float[Array, "n_out n_in"], ...]


def _with_weights(net: ReLUNet, weights) -> ReLUNet:
    return eqx.tree_at(lambda n: n.weights, net, tuple(weights))


class WeightsEngine(eqx.Module):
    """The reference: gradient descent (any optax transformation) or flow on the weights."""

    net: ReLUNet
    X: Array
    y: Array
    optimizer: optax.GradientTransformation | None

    def loss(self, weights):
        f = forward(_with_weights(self.net, weights), self.X)[-1]
        return 0.5 * jnp.sum((f - self.y) ** 2)

    def init(self):
        ws = self.net.weights
        return ws if self.optimizer is None else (ws, self.optimizer.init(ws))

    def step(self, state, lr):
        ws, opt_state = state
        loss, grads = jax.value_and_grad(self.loss)(ws)
        updates, opt_state = self.optimizer.update(grads, opt_state, ws)
        return (optax.apply_updates(ws, updates), opt_state), loss

    def rate(self, ws, lr):
        return jax.tree.map(lambda g: -lr * g, jax.grad(self.loss)(ws))

    def _weights(self, state):
        return state if self.optimizer is None else state[0]

    def view(self, state) -> View:
        H, Z, D, _, Delta, f = fields(_with_weights(self.net, self._weights(state)), self.X)
        return View(r=f - self.y, H=H, Z=Z, D=D, Delta=Delta)

    def final(self, state) -> ReLUNet:
        return _with_weights(self.net, self._weights(state))


class CollectiveEngine(eqx.Module):
    """Fields evolved by the closure formulas: the exact discrete maps (I8) for `step`, the
    hierarchies (I2), (I4), (I5) applied matrix-free (I6) for `rate`. For L = 1 the carried
    state holds no weight matrix (I3)."""

    net: ReLUNet
    X: Array
    y: Array
    C: Array | None  # the input Gram X Xᵀ, when applying it is cheaper than X (Xᵀ ·)
    transport: int | None = eqx.field(static=True, default=None)
    continuous: bool = eqx.field(static=True, default=False)

    @classmethod
    def build(cls, net, X, y, transport=None, continuous=False):
        P, d = X.shape
        return cls(net, X, y, X @ X.T if P < 2 * d else None, transport, continuous)

    def residual(self, H_L):
        """`r = s_out relu(H_L) a − y`: the residual is a function of the top field."""
        return self.net.scales[-1] * (jax.nn.relu(H_L) @ self.net.readout) - self.y

    def _apply_C(self, E):
        return self.C @ E if self.C is not None else self.X @ (self.X.T @ E)

    def init(self) -> FieldState:
        H, _, _, B, _, f = fields(self.net, self.X)
        if self.continuous:
            return FieldState(H=H, B=(), r=None, weights=self.net.weights[1:])
        return FieldState(H=H, B=B[:-1], r=f - self.y, weights=self.net.weights[1:])

    def view(self, st: FieldState) -> View:
        Z = (self.X, *(jax.nn.relu(h) for h in st.H))
        D = masks(st.H)
        top = output_field(self.net, self.X.shape[0])
        if self.continuous:
            _, Delta = pullback(self.net.scales, (None, *st.weights), D, top)
        else:
            Delta = tuple(apply_mask(d, b) for d, b in zip(D, (*st.B, top)))
        r = self.residual(st.H[-1]) if st.r is None else st.r
        return View(r=r, H=st.H, Z=Z, D=D, Delta=Delta)

    def step(self, st: FieldState, lr):
        """One GD step by the exact maps (I8), with E_l = Σ_i r_i Δ_l[i] and the weights
        before the step:

            H_l'     = s_l Z'_{l-1} W_lᵀ − η s_l² (Z'_{l-1} Z_{l-1}ᵀ) E_l   (H_1' = H_1 − η s_1² C E_1)
            B'_{l-1} = s_l Δ'_l W_l     − η s_l² (Δ'_l · E_l) Z_{l-1}
            W_l'     = W_l − η s_l E_lᵀ Z_{l-1}                            (l ≥ 2 only)

        Contracted in the cheaper order (I6): when the mixed Gram `(Z' Zᵀ) E` costs more
        than `Z' (Zᵀ E)`, the two terms of each map share `Zᵀ E` and fold into one product
        with the updated generator, `H_l' = s_l Z'_{l-1} W_l'ᵀ`, `B'_{l-1} = s_l Δ'_l W_l'`.
        """
        if self.transport is not None:
            return self._euler_step(st, lr)
        s, W, L = self.net.scales, (None, *st.weights), len(st.H)
        v = self.view(st)
        E = tuple(residual_weighted(v.r, d) for d in v.Delta)
        P = self.X.shape[0]
        # Updated generators W_l' = W_l − η s_l E_lᵀ Z_{l-1} (l ≥ 2).
        Wn = (None, *(W[l] - lr * s[l] * (E[l].T @ v.Z[l]) for l in range(1, L)))
        fold = [P * (W[l].shape[0] + W[l].shape[1]) >= 2 * W[l].size if l else False
                for l in range(L)]
        H = [st.H[0] - lr * s[0] ** 2 * self._apply_C(E[0])]
        Z = [self.X, jax.nn.relu(H[0])]
        for l in range(1, L):
            if fold[l]:
                H.append(s[l] * (Z[-1] @ Wn[l].T))
            else:
                transport = s[l] * (Z[-1] @ W[l].T)
                H.append(transport - lr * s[l] ** 2 * gram_apply(Z[-1], v.Z[l], E[l]))
            Z.append(jax.nn.relu(H[-1]))
        D = masks(H)
        B = [output_field(self.net, P)]
        for l in range(L - 1, 0, -1):
            Delta = apply_mask(D[l], B[-1])
            if fold[l]:
                B.append(s[l] * (Delta @ Wn[l]))
            else:
                transport = s[l] * (Delta @ W[l])
                B.append(transport - lr * s[l] ** 2 * gram_apply(Delta, E[l], v.Z[l]))
        r = self.residual(H[-1])
        new = FieldState(H=tuple(H), B=tuple(reversed(B[1:])), r=r, weights=Wn[1:])
        return new, 0.5 * jnp.sum(v.r**2)

    def _euler_step(self, st: FieldState, lr):
        """Truncated closure in discrete time: an Euler step of the truncated flow (DESIGN §3)."""
        d = self.rate(st, lr)
        add = lambda a, b: tuple(x + dx for x, dx in zip(a, b))  # noqa: E731
        H = add(st.H, d.H)
        new = FieldState(H=H, B=add(st.B, d.B), r=self.residual(H[-1]), weights=add(st.weights, d.weights))
        return new, 0.5 * jnp.sum(st.r**2)

    def rate(self, st: FieldState, lr) -> FieldState:
        """Gradient-flow derivative of the carried fields: (I4) for H, (I5) for B (discrete
        truncated closures only; see `FieldState`), and `dW_l = −η s_l E_lᵀ Z_{l-1}` for the
        operator generators. The residual is read off `H_L` (`r` is `None` in the rate), so
        it obeys (I2) exactly along the fields."""
        v = self.view(st)
        s, W = self.net.scales, (None, *st.weights)
        _, dH, dB, E = rates(s, W, v.Z, v.D, v.Delta, v.r, transport=self.transport)
        dW = tuple(-s[l] * (E[l].T @ v.Z[l]) for l in range(1, len(st.H)))
        rate = FieldState(H=dH, B=() if self.continuous else dB[:-1], r=None, weights=dW)
        return jax.tree.map(lambda a: lr * a, rate)

    def final(self, st: FieldState) -> FieldState:
        return st


class FrozenKernelEngine(eqx.Module):
    """Lazy / NTK limit: the kernel frozen at t = 0, `r_n = (I − ηK₀)^n r₀` and
    `r(t) = exp(−ηK₀t) r₀`, through one eigendecomposition `K₀ = U diag(λ) Uᵀ`. The state is
    `c = Uᵀ r` (flattened over outputs)."""

    U: Array
    lam: Array
    r0: Array

    @classmethod
    def build(cls, net, X, y):
        lam, U = jnp.linalg.eigh(flat_kernel(collective_kernel(net, X)))
        return cls(U=U, lam=lam, r0=forward(net, X)[-1] - y)

    def init(self):
        return self.U.T @ self.r0.reshape(-1)

    def step(self, c, lr):
        return (1 - lr * self.lam) * c, 0.5 * jnp.sum(c**2)

    def rate(self, c, lr):
        return -lr * self.lam * c

    def at_time(self, t, lr):
        """Closed form `c(t) = exp(−ηλt) c(0)`."""
        return jnp.exp(-lr * self.lam * t) * self.init()

    def view(self, c) -> View:
        return View(r=(self.U @ c).reshape(self.r0.shape))

    def final(self, c):
        return self.view(c).r


class PairedEngine(eqx.Module):
    """Two engines advanced together, so one can be measured against the other."""

    main: eqx.Module
    ref: eqx.Module

    def init(self):
        return self.main.init(), self.ref.init()

    def step(self, state, lr):
        a, loss = self.main.step(state[0], lr)
        b, _ = self.ref.step(state[1], lr)
        return (a, b), loss

    def rate(self, state, lr):
        return self.main.rate(state[0], lr), self.ref.rate(state[1], lr)

    def view(self, state):
        return self.main.view(state[0])

    def ref_view(self, state):
        return self.ref.view(state[1])

    def final(self, state):
        return self.main.final(state[0])


def build_engine(name, net, X, y, *, optimizer=None, transport=None, continuous=False):
    if name == "weights":
        return WeightsEngine(net, X, y, None if continuous else optimizer)
    if name == "collective":
        return CollectiveEngine.build(net, X, y, transport, continuous)
    return FrozenKernelEngine.build(net, X, y)
