"""Validation of user inputs, done once at each public entry point.

Shapes and dtypes are static and checked at trace time (`ValueError` / `TypeError`). Finiteness
depends on values: concrete arrays are checked eagerly (`ValueError`); traced arrays (under
`jax.jit`, `jax.vmap`, `jax.grad`) are wrapped in `equinox.error_if`, so a NaN or inf in `X`
or `y` raises at run time instead of flowing silently into the results.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def _as_array(name: str, x) -> jax.Array:
    if isinstance(x, jax.core.Tracer):
        return x
    try:
        return jnp.asarray(x)
    except TypeError as err:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.") from err


def _check_finite(name: str, x: jax.Array) -> jax.Array:
    if isinstance(x, jax.core.Tracer):
        return eqx.error_if(
            x, ~jnp.all(jnp.isfinite(x)), f"`{name}` contains NaN or inf values."
        )
    if len(getattr(getattr(x, "sharding", None), "device_set", ())) > 1:
        # Spread over devices (or processes): checked where it lives, not copied to the host.
        if bool(jnp.all(jnp.isfinite(x))):
            return x
        if not x.is_fully_addressable:
            raise ValueError(f"`{name}` contains NaN or inf values; clean or drop those "
                             "samples.")
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{name}` contains {int(bad.sum())} NaN or inf value(s), the first at index "
            f"{where}; clean or drop those samples."
        )
    return x


def _check_dtype(name: str, x: jax.Array, dtype, against: str = "the network",
                 fix: str | None = None) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` has dtype {x.dtype}; gramflow needs floating-point data. "
            f"Cast it with `{name}.astype({jnp.dtype(dtype).name})`."
        )
    if x.dtype != dtype:
        fix = f"build the network with `dtype={x.dtype.name}`" if fix is None else fix
        raise TypeError(
            f"mixed dtypes: `{name}` is {x.dtype} but {against} is {jnp.dtype(dtype).name}; "
            f"cast `{name}` with `.astype({jnp.dtype(dtype).name})` or {fix}."
        )


def check_data(X, y=None, *, net=None, out_dim: int | None = None):
    """Validate `X` of shape `(P, d)` and `y` of shape `(P,)` or `(P, k)`: against `net` if
    given, else (before any network exists, as in `sweep`) against the argument `out_dim`
    (`None`: scalar targets) and `X`'s own floating dtype.

    Returns `(X, y)` as arrays, wrapped in `equinox.error_if` when traced.
    """
    X = _as_array("X", X)
    if X.ndim != 2:
        raise ValueError(
            f"`X` must be 2-D of shape (P, d), one row per sample, got shape {X.shape}."
        )
    if net is not None and X.shape[1] != net.in_dim:
        raise ValueError(
            f"`X` has shape {X.shape}: its {X.shape[1]} columns must equal the network's "
            f"in_dim = {net.in_dim}."
        )
    if X.shape[0] == 0:
        raise ValueError("`X` has no samples (P = 0).")
    if net is not None:
        dtype, k, against, fix = net.dtype, net.out_dim, "the network", None
    else:
        dtype = X.dtype if jnp.issubdtype(X.dtype, jnp.floating) else jnp.result_type(float)
        k, against, fix = out_dim, "`X`", "cast `X` (the networks are built in its dtype)"
    _check_dtype("X", X, dtype, against, fix)
    X = _check_finite("X", X)
    if y is None:
        return X, None
    y = _as_array("y", y)
    P = X.shape[0]
    expected = (P,) if k is None else (P, k)
    if y.shape != expected:
        what = "a scalar output" if k is None else f"an output of dimension k = {k}"
        owner = "the network has" if net is not None else f"`out_dim` = {out_dim} asks for"
        hint = "" if net is not None else (
            " (`out_dim=None` for targets of shape (P,), `out_dim=k` for (P, k))")
        raise ValueError(
            f"`y` has shape {y.shape}, but `X` has P = {P} samples and {owner} {what}: "
            f"expected `y` of shape {expected}{hint}."
        )
    _check_dtype("y", y, dtype, against, fix)
    y = _check_finite("y", y)
    return X, y
