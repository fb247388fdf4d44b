r"""Lazy-limit predictions: training with the kernel frozen, in closed form, on the training
set and at any other sites.

With the kernel `K` of the training set frozen (the finite `K₀` of a network, or the
infinite-width limit), the residual obeys `dr/dt = −η K r`, and an input x that is not trained
on moves by `df(x)/dt = −η K(x, X) r`. Both integrate through one eigendecomposition
`K = U diag(λ) Uᵀ`:

$$f_\text{train}(t) = y + U e^{-\eta\Lambda t} U^\top r_0,\qquad
f(x, t) = f_0(x) - K(x, X)\, U \varphi_t(\Lambda)\, U^\top r_0,\qquad
\varphi_t(\lambda) = \frac{1 - e^{-\eta\lambda t}}{\lambda},$$

and after n steps of gradient descent `(1 − ηλ)^n` and `φ_n(λ) = (1 − (1 − ηλ)^n)/λ` take
their place. Both `φ` are finite at `λ = 0` (`ηt`, `ηn`), so a singular kernel is fine: its
null space simply does not move.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._algebra import flat_kernel


class LazyPredictions(eqx.Module):
    """Outputs under the frozen kernel at each requested time or step (leading axis T).

    - `train`: `(T, P)` or `(T, P, k)`, the outputs on the training set.
    - `r`: the residuals `train − y`, same shape.
    - `test`: `(T, Q)` or `(T, Q, k)` at the other sites, or `None` without `K_test`.
    """

    train: Float[Array, "T P *k"]
    r: Float[Array, "T P *k"]
    test: Float[Array, "T Q *k"] | None


def _decay_and_phi(lam, lr, times, discrete: bool):
    """`(1 − ηλ)^n` and `φ_n(λ)` for discrete steps n, `e^{−ηλt}` and `φ_t(λ)` for flow
    times t; `(T, M)`. Small `ηλ` uses `expm1`/`log1p`, exact also at λ = 0."""
    x = lr * lam[None, :]  # ηλ, (1, M)
    n = times[:, None]
    if discrete:
        small = jnp.abs(x) < 0.5
        x_small = jnp.where(small, x, 0.0)
        decay_small = jnp.exp(n * jnp.log1p(-x_small))
        decay = jnp.where(small, decay_small, (1.0 - x) ** n)
        one_minus = jnp.where(small, -jnp.expm1(n * jnp.log1p(-x_small)), 1.0 - decay)
    else:
        decay = jnp.exp(-x * n)
        one_minus = -jnp.expm1(-x * n)
    safe = jnp.where(x == 0, 1.0, x)
    phi = jnp.where(x == 0, lr * n, lr * one_minus / safe)  # (1 − decay)/λ = η(1 − decay)/x
    return decay, phi


def lazy_predictions(
    K: Float[Array, "P P *kk"],
    y: Float[Array, "P *k"],
    f0: Float[Array, "P *k"] | None = None,
    *,
    lr,
    steps=None,
    t=None,
    K_test: Float[Array, "Q P *kk"] | None = None,
    f0_test: Float[Array, "Q *k"] | None = None,
) -> LazyPredictions:
    """Train and test outputs of gradient descent (or flow) with the kernel frozen.

    **Arguments:**

    - `K`: the training kernel, `(P, P)` or `(P, P, k, k)` — `collective_kernel(net, X)` for
      the network's own lazy regime, `limit_kernels(net, X).total` for the infinite-width one.
    - `y`: targets `(P,)` or `(P, k)`; `f0`: outputs at initialization (default zeros, the
      mean of the limit).
    - `lr`: the step size η (an array value: changing it does not recompile).
    - exactly one of `steps` (numbers of gradient-descent steps, ints) or `t` (flow times),
      each a scalar or a 1-D array of T values.
    - `K_test`: the cross kernel `K(X_test, X)`, `(Q, P)` or `(Q, P, k, k)`; `f0_test`: the
      test outputs at initialization (default zeros).

    **Returns:** `LazyPredictions` with `train`, `r` and `test` of leading axis T.
    """
    if (steps is None) == (t is None):
        raise ValueError("pass exactly one of `steps` (gradient-descent steps) or `t` (flow "
                         "times).")
    times = jnp.atleast_1d(jnp.asarray(steps if t is None else t))
    if times.ndim != 1:
        raise ValueError(f"`steps`/`t` must be a scalar or a 1-D array, got shape {times.shape}.")
    if t is None and not jnp.issubdtype(times.dtype, jnp.integer):
        raise TypeError(f"`steps` must be integers, got dtype {times.dtype}; for continuous "
                        "time pass `t=`.")
    y = jnp.asarray(y)
    dtype = jnp.result_type(K, y)
    P = K.shape[0]
    if K.shape[:2] != (P, P) or K.ndim not in (2, 4) or y.shape[0] != P:
        raise ValueError(f"`K` must be (P, P) or (P, P, k, k) and `y` (P,) or (P, k) for the "
                         f"same P; got K {K.shape}, y {y.shape}.")
    f0 = jnp.zeros_like(y, dtype) if f0 is None else jnp.asarray(f0, dtype)
    lam, U = jnp.linalg.eigh(flat_kernel(K))
    c0 = U.T @ (f0 - y).reshape(-1)
    decay, phi = _decay_and_phi(lam, jnp.asarray(lr, dtype), times.astype(dtype), t is None)
    r = ((decay * c0[None]) @ U.T).reshape((-1,) + y.shape)
    test = None
    if K_test is not None:
        Kt = flat_kernel(K_test)
        if Kt.shape[1] != U.shape[0]:
            raise ValueError(f"`K_test` must be (Q, P) or (Q, P, k, k) with P = {P}, got "
                             f"{K_test.shape}.")
        moved = (phi * c0[None]) @ U.T @ Kt.T  # (T, Q·k)
        Q = K_test.shape[0]
        base = (jnp.zeros((Q,) + y.shape[1:], dtype) if f0_test is None
                else jnp.asarray(f0_test, dtype))
        test = base[None] - moved.reshape((-1,) + base.shape)
    return LazyPredictions(train=r + y[None], r=r, test=test)

