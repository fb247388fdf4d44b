"""The fixed-readout, bias-free ReLU network as a pytree."""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

PARAMETRIZATIONS = ("standard", "ntk", "mean_field")


def _scales(parametrization: str, in_dim: int, widths: Sequence[int]) -> list[float]:
    """Layer scales `s_1..s_L, s_out` of a parametrization, from the true widths."""
    fan_ins = [in_dim, *widths[:-1]]
    if parametrization == "standard":
        return [1.0] * (len(widths) + 1)
    hidden = [1.0 / math.sqrt(n) for n in fan_ins]
    if parametrization == "ntk":
        return [*hidden, 1.0 / math.sqrt(widths[-1])]
    return [*hidden, 1.0 / widths[-1]]  # mean_field


def _is_floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


class ReLUNet(eqx.Module):
    r"""Bias-free ReLU network with a fixed readout.

    $$h_l = s_l\, W_l z_{l-1},\quad z_l = \mathrm{relu}(h_l),\quad z_0 = x,\quad
    f = s_\text{out}\, a^\top z_L,$$

    batch-first: `H_l = s_l Z_{l-1} W_lᵀ` of shape `(P, N_l)` and `f = s_out Z_L a` of shape
    `(P,)` (scalar output) or `(P, k)` (vector output). Only the hidden weights `W_1..W_L` are
    trained; the readout `a` is fixed. The scales are an array leaf, so a width sweep can
    trace them.

    | parametrization | `W_l` entries     | readout entries | `s_l`          | `s_out`      |
    | ---------------- | ----------------- | --------------- | -------------- | ------------ |
    | `"standard"`     | N(0, 1/N_{l-1})   | N(0, 1/N_L)     | 1              | 1            |
    | `"ntk"`          | N(0, 1)           | N(0, 1)         | 1/√N_{l-1}     | 1/√N_L       |
    | `"mean_field"`   | N(0, 1)           | N(0, 1)         | 1/√N_{l-1}     | 1/N_L        |

    (`N_0 = d`, the input dimension.) A network built by direct construction has
    `parametrization="custom"`.

    **Fields:**

    - `weights`: tuple of `W_l`, shape `(N_l, N_{l-1})`, l = 1..L.
    - `readout`: `a`, shape `(N_L,)` (scalar output) or `(N_L, k)` (vector output).
    - `scales`: shape `(L+1,)`, the values `s_1, ..., s_L, s_out`.
    - `parametrization`: static name, for bookkeeping only (the scales are what is used).

    A batch of networks (e.g. `jax.vmap(lambda k: ReLUNet.init(k, d, widths))(keys)`) has a
    leading axis on every leaf; every gramflow function accepts one under `jax.vmap`.
    """

    weights: tuple[Float[Array, "n_out n_in"], ...]
    readout: Float[Array, "n_last *k"]
    scales: Float[Array, " L_plus_1"]
    parametrization: str = eqx.field(static=True, default="custom")

    def __init__(self, weights, readout, scales, parametrization: str = "custom"):
        if isinstance(weights, (jax.Array, np.ndarray)):
            raise TypeError(
                "`weights` must be a tuple or list of 2-D arrays W_l of shape (N_l, N_{l-1}), "
                f"got a single array of shape {weights.shape}."
            )
        self.weights = tuple(jnp.asarray(w) for w in weights)
        self.readout = jnp.asarray(readout)
        self.scales = jnp.asarray(scales)
        self.parametrization = parametrization

    def __check_init__(self):
        L = len(self.weights)
        if L == 0:
            raise ValueError("`weights` is empty: a ReLUNet needs at least one hidden layer.")
        dtype = self.readout.dtype
        named = [(f"weights[{i}]", w) for i, w in enumerate(self.weights)]
        for name, leaf in [*named, ("readout", self.readout), ("scales", self.scales)]:
            if not _is_floating(leaf):
                raise TypeError(
                    f"`{name}` has dtype {leaf.dtype}; gramflow needs floating-point "
                    "parameters (cast with `.astype(jnp.float32)` or `jnp.float64`)."
                )
            if leaf.dtype != dtype:
                raise TypeError(
                    f"mixed dtypes: `{name}` is {leaf.dtype} but `readout` is {dtype}; "
                    "give every leaf the same floating dtype."
                )
        for i, w in enumerate(self.weights):
            if w.ndim != 2:
                raise ValueError(
                    f"`weights[{i}]` (W_{i + 1}) must be 2-D of shape (N_{i + 1}, N_{i}), "
                    f"got shape {w.shape}."
                )
            if i > 0 and w.shape[1] != self.weights[i - 1].shape[0]:
                raise ValueError(
                    f"`weights[{i}]` has shape {w.shape}: its fan-in {w.shape[1]} must equal "
                    f"the width {self.weights[i - 1].shape[0]} of the layer below "
                    f"(`weights[{i - 1}]` has shape {self.weights[i - 1].shape})."
                )
        n_last = self.weights[-1].shape[0]
        if self.readout.ndim not in (1, 2) or self.readout.shape[0] != n_last:
            raise ValueError(
                f"`readout` must have shape ({n_last},) or ({n_last}, k) to match the last "
                f"hidden width N_L = {n_last}, got shape {self.readout.shape}."
            )
        if self.scales.shape != (L + 1,):
            raise ValueError(
                f"`scales` must have shape (L+1,) = ({L + 1},) holding s_1..s_L, s_out, "
                f"got shape {self.scales.shape}."
            )
        if self.parametrization not in (*PARAMETRIZATIONS, "custom"):
            raise ValueError(
                f"unknown parametrization {self.parametrization!r}; "
                f"expected one of {PARAMETRIZATIONS} (or 'custom')."
            )

    @classmethod
    def init(
        cls,
        key: PRNGKeyArray,
        in_dim: int,
        widths: Sequence[int],
        *,
        out_dim: int | None = None,
        parametrization: str = "ntk",
        dtype=None,
    ) -> ReLUNet:
        """Random network in one of the parametrizations of the class docstring.

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `in_dim`: input dimension `d = N_0`.
        - `widths`: hidden widths `(N_1, ..., N_L)`, L ≥ 1.
        - `out_dim`: `None` for a scalar output (`f` of shape `(P,)`), or `k` for `f` of
          shape `(P, k)`.
        - `parametrization`: `"standard"`, `"ntk"` (default) or `"mean_field"`.
        - `dtype`: floating dtype of every leaf; `None` means JAX's default floating dtype
          (float64 when x64 is enabled, else float32).
        """
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {parametrization!r}; expected one of {PARAMETRIZATIONS}."
            )
        in_dim = _positive_int("in_dim", in_dim)
        if isinstance(widths, (int, np.integer)):
            widths = (widths,)
        widths = tuple(widths)
        if len(widths) == 0:
            raise ValueError("`widths` is empty: give at least one hidden width, e.g. (64,).")
        widths = tuple(_positive_int(f"widths[{i}]", n) for i, n in enumerate(widths))
        if out_dim is not None:
            out_dim = _positive_int("out_dim", out_dim)
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")

        fan_ins = (in_dim, *widths[:-1])
        keys = jax.random.split(key, len(widths) + 1)
        standard = parametrization == "standard"
        weights = tuple(
            jax.random.normal(k, (n, m), dtype) * (1.0 / math.sqrt(m) if standard else 1.0)
            for k, n, m in zip(keys[:-1], widths, fan_ins)
        )
        shape = (widths[-1],) if out_dim is None else (widths[-1], out_dim)
        readout = jax.random.normal(keys[-1], shape, dtype)
        if standard:
            readout = readout / math.sqrt(widths[-1])
        scales = jnp.asarray(_scales(parametrization, in_dim, widths), dtype)
        return cls(weights, readout, scales, parametrization)

    @property
    def depth(self) -> int:
        """Number of hidden (trained) layers L."""
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        """Hidden widths `(N_1, ..., N_L)`."""
        return tuple(w.shape[-2] for w in self.weights)

    @property
    def in_dim(self) -> int:
        """Input dimension `d = N_0`."""
        return self.weights[0].shape[-1]

    @property
    def out_dim(self) -> int | None:
        """`None` for scalar output, else `k`."""
        return None if self.readout.ndim == 1 else self.readout.shape[-1]

    @property
    def dtype(self):
        return self.readout.dtype

    def __call__(self, X: Float[Array, "P d"]) -> Float[Array, "P *k"]:
        """Network output `f = s_out Z_L a`, shape `(P,)` or `(P, k)`."""
        from ._checks import check_inputs
        from ._state import forward

        X, _ = check_inputs(self, X)
        return forward(self, X)[-1]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value}.")
    return int(value)
