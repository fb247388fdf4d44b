"""The fixed-readout, bias-free ReLU network as a pytree."""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_data
from .._mask import Mask
from .interop import build_mlp, mlp_arrays
from .layer import TRAINABLE, Layer, LayerParams

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

    **Structure** (optional; every gramflow function accepts it): a layer may be

    $$h_l = g_l\, s_l\, (W_l \odot M_l)\, z_{l-1} + \alpha_l\, z_{l-1},$$

    with a fixed binary connectivity mask `M_l` (constrained pathways, `Mask`), a per-layer
    gain `g_l` and a skip path of strength `α_l` (equal widths `N_l = N_{l-1}`). All of these
    keep the layer linear in `z_{l-1}` and the network positively homogeneous, so the
    identities (I1)–(I8) hold with the effective weights
    `W̃_l = g_l s_l (W_l ⊙ M_l) + α_l I` in the pullback recursion (I1) and in the transport
    of (I4)/(I5), and the layer kernel gains one term per trained parameter (see
    `layer_kernels`).

    - `masks`: static tuple of `Mask` or `None` per layer, or `None`.
    - `gains`: `(L,)` array of `g_l`, or `None` (all 1).
    - `skips`: tuple of scalar `α_l` or `None` per layer, or `None`.
    - `train`: static tuple of what gradient descent trains, from `("weights", "gains",
      "skips")`; the readout never is.

    A batch of networks (e.g. `jax.vmap(lambda k: ReLUNet.init(k, d, widths))(keys)`) has a
    leading axis on every leaf; every gramflow function accepts one under `jax.vmap`.
    """

    weights: tuple[Float[Array, "n_out n_in"], ...]
    readout: Float[Array, "n_last *k"]
    scales: Float[Array, " L_plus_1"]
    parametrization: str = eqx.field(static=True, default="custom")
    masks: tuple[Mask | None, ...] | None = eqx.field(static=True, default=None)
    gains: Float[Array, " L"] | None = None
    skips: tuple[Float[Array, ""] | None, ...] | None = None
    train: tuple[str, ...] = eqx.field(static=True, default=("weights",))

    def __init__(self, weights, readout, scales, parametrization: str = "custom", *,
                 masks=None, gains=None, skips=None, train=None):
        if isinstance(weights, (jax.Array, np.ndarray)):
            raise TypeError(
                "`weights` must be a tuple or list of 2-D arrays W_l of shape (N_l, N_{l-1}), "
                f"got a single array of shape {weights.shape}."
            )
        self.weights = tuple(jnp.asarray(w) for w in weights)
        self.readout = jnp.asarray(readout)
        self.scales = jnp.asarray(scales)
        self.parametrization = parametrization
        if masks is not None:
            masks = tuple(m if m is None or isinstance(m, Mask) else Mask(m) for m in masks)
            if all(m is None for m in masks):
                masks = None
        self.masks = masks
        self.gains = None if gains is None else jnp.asarray(gains)
        if skips is not None:
            skips = tuple(None if a is None else jnp.asarray(a) for a in skips)
            if all(a is None for a in skips):
                skips = None
        self.skips = skips
        if train is None:
            train = ("weights",) + (("gains",) if gains is not None else ())
        elif isinstance(train, str):
            train = (train,)
        self.train = tuple(train)

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
        self._check_structure()

    def _check_structure(self):
        L, dtype = len(self.weights), self.readout.dtype
        if self.masks is not None:
            if len(self.masks) != L:
                raise ValueError(f"`masks` must have one entry (Mask or None) per layer, L = {L}, "
                                 f"got {len(self.masks)}.")
            for i, (m, w) in enumerate(zip(self.masks, self.weights)):
                if m is not None and m.shape != w.shape[-2:]:
                    raise ValueError(f"`masks[{i}]` has shape {m.shape} but `weights[{i}]` has "
                                     f"shape {w.shape[-2:]}; they must match.")
        if self.gains is not None:
            if self.gains.shape[-1:] != (L,) or self.gains.dtype != dtype:
                raise ValueError(f"`gains` must be an array of shape (L,) = ({L},) and dtype "
                                 f"{dtype}, got shape {self.gains.shape}, dtype {self.gains.dtype}.")
        if self.skips is not None:
            if len(self.skips) != L:
                raise ValueError(f"`skips` must have one entry (α_l or None) per layer, L = {L}, "
                                 f"got {len(self.skips)}.")
            for i, (a, w) in enumerate(zip(self.skips, self.weights)):
                if a is None:
                    continue
                if a.dtype != dtype:
                    raise TypeError(f"`skips[{i}]` has dtype {a.dtype}; use the network's {dtype}.")
                if w.shape[-1] != w.shape[-2]:
                    raise ValueError(
                        f"`skips[{i}]`: a skip path h = s W z + α z needs equal widths, but "
                        f"layer {i + 1} maps {w.shape[-1]} to {w.shape[-2]} units; set it to None."
                    )
        bad = [t for t in self.train if t not in TRAINABLE]
        if bad or not self.train:
            raise ValueError(f"`train` must be a non-empty subset of {TRAINABLE}, got {self.train!r} "
                             "(the readout is fixed by design).")
        for name in ("gains", "skips"):
            if name in self.train and getattr(self, name) is None:
                raise ValueError(f"`train` includes {name!r} but the network has no {name}.")

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The hidden layers as `Layer` objects (`W̃_l = g_l s_l (W_l ⊙ M_l) + α_l I`), the
        unit every gramflow function computes with; a dense layer is the trivial case."""
        out = []
        for l, W in enumerate(self.weights):
            gain = None if self.gains is None else self.gains[l]
            skip = None if self.skips is None else self.skips[l]
            train = tuple(t for t, present in (("weights", True), ("gains", gain is not None),
                                               ("skips", skip is not None))
                          if t in self.train and present)
            out.append(Layer(weight=W, scale=self.scales[l], gain=gain, skip=skip,
                             mask=None if self.masks is None else self.masks[l],
                             train=train, shape=tuple(W.shape[-2:])))
        return tuple(out)

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
        masks: Sequence[Mask | None] | None = None,
        gains: float | None = None,
        skips: float | Sequence[float | None] | None = None,
        train: Sequence[str] | None = None,
        activation: str = "relu",
        bias: bool = False,
        gamma0: float = 1.0,
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
        - `masks`: per-layer `Mask` (or 0/1 array, or `None` for dense), e.g.
          `Mask.block_diagonal((N_l, N_{l-1}), 4)`. Masked-out weights are initialized to 0
          and receive zero gradient, so they stay 0; the scales and the `"standard"` init use
          the mask's mean fan-in.
        - `gains`: initial value of every per-layer gain `g_l` (trained by default), or `None`.
        - `skips`: skip strength `α` for every layer with equal in and out widths, or one
          `α_l`/`None` per layer, or `None`.
        - `train`: what gradient descent trains (default: weights, and gains if any).
        - `gamma0`: the richness knob γ₀ > 0: the output is scaled by `1/γ₀`
          (`s_out → s_out / γ₀`), so the kernels scale by `1/γ₀²`; pair it with
          `natural_lr(net, η₀)`, which scales η by `γ₀²` (and the parametrization's width
          factor) to keep the dynamics O(1). Small γ₀ (or the NTK parametrization at large
          width) is lazy; mean field at fixed γ₀ moves its features at any width.
        - `activation`, `bias`: only `"relu"` and `False` are supported — see the error for why.
        """
        if activation != "relu":
            raise ValueError(
                f"activation {activation!r} is not supported: gramflow's identities need a "
                "positively homogeneous activation with a 0/1 derivative (ReLU). The pullback "
                "hierarchy (I5) rests on z_k = J^z_(k<-l) z_l, which tanh, GELU or softplus "
                "break, and (I3)-(I8) use D_l ∈ {0, 1}."
            )
        if bias:
            raise ValueError(
                "biases are not supported: with h = s W z + b the network is no longer positively "
                "homogeneous, so z_k ≠ J^z_(k<-l) z_l and the backward hierarchy (I5) and the "
                "exact maps (I8) fail. A skip path (`skips=`) or gains (`gains=`) keep the "
                "identities; a constant input feature plays the role of a first-layer bias."
            )
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
        L = len(widths)
        if masks is not None:
            masks = tuple(masks)
            if len(masks) != L:
                raise ValueError(f"`masks` must have one entry per layer ({L}), got {len(masks)}.")
            masks = tuple(m if m is None or isinstance(m, Mask) else Mask(m) for m in masks)
            for i, m in enumerate(masks):
                if m is not None and m.shape != (widths[i], fan_ins[i]):
                    raise ValueError(f"`masks[{i}]` has shape {m.shape}, expected "
                                     f"({widths[i]}, {fan_ins[i]}) for widths {widths}.")
        eff_fan = tuple(m.fan_in if m is not None else n
                        for m, n in zip(masks or (None,) * L, fan_ins))
        keys = jax.random.split(key, len(widths) + 1)
        standard = parametrization == "standard"
        weights = tuple(
            jax.random.normal(k, (n, m), dtype) * (1.0 / math.sqrt(f) if standard else 1.0)
            for k, n, m, f in zip(keys[:-1], widths, fan_ins, eff_fan)
        )
        if masks is not None:
            weights = tuple(w if m is None else w * jnp.asarray(m.array, dtype)
                            for w, m in zip(weights, masks))
        shape = (widths[-1],) if out_dim is None else (widths[-1], out_dim)
        readout = jax.random.normal(keys[-1], shape, dtype)
        if standard:
            readout = readout / math.sqrt(widths[-1])
        scales = _scales(parametrization, in_dim, widths)
        if parametrization != "standard":
            scales[:-1] = [1.0 / math.sqrt(f) for f in eff_fan]
        if not isinstance(gamma0, jax.core.Tracer) and not (np.isfinite(gamma0) and gamma0 > 0):
            raise ValueError(f"`gamma0` must be positive and finite, got {gamma0!r}.")
        scales = jnp.asarray(scales, dtype).at[-1].divide(gamma0)
        if gains is not None:
            gains = jnp.full((L,), gains, dtype)
        if skips is not None:
            if isinstance(skips, (int, float, np.floating)):
                square = [n == m for n, m in zip(widths, fan_ins)]
                if not any(square):
                    raise ValueError(f"`skips={skips}` needs a layer with equal in and out widths; "
                                     f"(in_dim, *widths) = {(in_dim, *widths)} has none.")
                skips = [skips if sq else None for sq in square]
            skips = tuple(None if a is None else jnp.asarray(a, dtype) for a in skips)
        return cls(weights, readout, scales, parametrization, masks=masks, gains=gains,
                   skips=skips, train=train)

    @classmethod
    def from_equinox(cls, mlp, *, parametrization: str = "standard") -> ReLUNet:
        """The `ReLUNet` computing the same function as a bias-free ReLU `eqx.nn.MLP`; its last
        layer becomes the fixed readout.

        **Arguments:** `mlp`: an `equinox.nn.MLP` with `use_bias=False`,
        `use_final_bias=False`, `activation=jax.nn.relu` and the identity final activation
        (anything else raises, saying why); `parametrization`: the scales `s_l` to factor out
        of the weights — `"standard"` (`s = 1`, the weights are equinox's), `"ntk"` or
        `"mean_field"` (`W_l = W_l^eqx / s_l`, `a = W_out^eqxᵀ / s_out`), which sets how
        `parametrization`-dependent quantities (and a learning rate) are scaled.

        **Returns:** a `ReLUNet` with `net(x) == mlp(x)` and `train=("weights",)`; for
        `out_size="scalar"` a scalar-output network, else `out_dim = out_size`.
        """
        hidden, last, scalar = mlp_arrays(mlp)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"`parametrization` must be one of {PARAMETRIZATIONS}, "
                             f"got {parametrization!r}.")
        widths = [w.shape[0] for w in hidden]
        scales = _scales(parametrization, hidden[0].shape[1], widths)
        readout = last.T / scales[-1]
        return cls([w / s for w, s in zip(hidden, scales)], readout[:, 0] if scalar else readout,
                   jnp.asarray(scales, last.dtype), parametrization)

    def to_equinox(self):
        """The `eqx.nn.MLP` computing the same function: hidden layers apply the effective
        weights `W̃_l = g_l s_l (W_l ⊙ M_l) + α_l I` (so masks, gains and skip paths are
        folded into plain weights: the function is kept, the structure and the choice of
        trained parameters are not), the last layer applies `s_out aᵀ`. No biases, ReLU.
        Needs equal hidden widths (an `eqx.nn.MLP` has one `width_size`)."""
        check_net(self)
        readout = self.scales[-1] * self.readout
        last = readout[None, :] if self.out_dim is None else readout.T
        return build_mlp([layer.effective() for layer in self.layers], last,
                         self.out_dim is None)

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
        """Network output `f = s_out Z_L a`, shape `(P,)` or `(P, k)`; a single sample `x` of
        shape `(d,)` gives `f(x)` of shape `()` or `(k,)`, as equinox models do."""
        single = getattr(X, "ndim", None) == 1 and X.shape[0] == self.in_dim
        X, _ = check_inputs(self, jnp.asarray(X)[None] if single else X)
        f = forward(self, X)[-1]
        return f[0] if single else f


def gamma0(net: ReLUNet) -> Float[Array, ""]:
    """The richness γ₀ of a network built by `ReLUNet.init(..., gamma0=γ₀)`: its
    parametrization's readout scale over the actual one, `s_out(parametrization) / s_out`."""
    if net.parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"`net` has parametrization {net.parametrization!r}; γ₀ is defined "
                         f"relative to one of {PARAMETRIZATIONS}.")
    default = _scales(net.parametrization, net.in_dim, net.widths)[-1]
    return default / net.scales[-1]


def natural_lr(net: ReLUNet, eta0=1.0) -> Float[Array, ""]:
    """The learning rate that keeps the dynamics O(1) as widths grow, for the network's
    parametrization and richness γ₀: `η = η₀ γ₀² c` with `c = 1` (`"ntk"`), `N_L`
    (`"mean_field"`: `K ~ 1/N_L`) or `1 / max_l N_{l-1}` (`"standard"`: `K_l ~ N_{l-1}`);
    `N_0 = d`. Traced-friendly (an array)."""
    fan_in = max(net.in_dim, *net.widths[:-1]) if net.depth > 1 else net.in_dim
    width = {"ntk": 1.0, "mean_field": float(net.widths[-1]), "standard": 1.0 / fan_in}
    return jnp.asarray(eta0, net.dtype) * gamma0(net) ** 2 * width[net.parametrization]


def check_net(net) -> None:
    """`net` is a single, valid `ReLUNet` (a clear error otherwise)."""
    if not isinstance(net, ReLUNet):
        raise TypeError(
            f"`net` must be a gramflow.ReLUNet, got {type(net).__name__}. gramflow's "
            "identities hold for bias-free networks with a positively homogeneous activation "
            "(ReLU) and a fixed readout: the pullback hierarchy (I5) rests on "
            "z_k = J^z_{k←l} z_l, which biases and activations such as tanh or GELU break. "
            "Build the network with `gramflow.ReLUNet.init` (or `ReLUNet(weights=..., "
            "readout=..., scales=...)` from your own bias-free weights)."
        )
    if net.scales.ndim != 1:
        raise ValueError(
            f"`net` is a batch of networks (scales of shape {net.scales.shape}); map over it "
            "with `jax.vmap(fn, in_axes=(0, None, ...))` instead of passing it directly."
        )
    # `equinox.tree_at` and `jax.tree.unflatten` rebuild a module without `__init__`: validate
    # again (shapes and dtypes only, so this is free under `jax.jit`).
    net.__check_init__()


def check_inputs(net, X, y=None):
    """Validate `net`, `X` of shape `(P, d)` and `y` of shape `(P,)` or `(P, k)` against it.

    Returns `(X, y)` as arrays, wrapped in `equinox.error_if` when traced.
    """
    check_net(net)
    return check_data(X, y, net=net)


def forward(net: ReLUNet, X: Float[Array, "P d"]):
    """Forward pass through the effective weights. Returns `(H, Z, f)`: tuples `H_1..H_L`,
    `Z_0 = X, Z_1..Z_L`, and `f = s_out Z_L a`."""
    H, Z = [], [X]
    for layer in net.layers:
        H.append(Z[-1] @ layer.effective().T)
        Z.append(jax.nn.relu(H[-1]))
    return tuple(H), tuple(Z), net.scales[-1] * (Z[-1] @ net.readout)


# -- trained parameters ----------------------------------------------------------------------------

def trainable(net: ReLUNet, *, every: bool = False):
    """Filter spec (a pytree of bools shaped like `net`) of the trained leaves, or with
    `every=True` of the weights and every structure parameter, trained or not.

    Use it to differentiate only what gradient descent trains (never the fixed readout or
    the scales): `params, rest = eqx.partition(net, gf.trainable(net))`, then
    `eqx.filter_grad` of a function of `eqx.combine(params, rest)`."""
    chosen = TRAINABLE if every else net.train
    spec = jax.tree.map(lambda _: False, net)
    return eqx.tree_at(
        lambda n: (n.weights, n.gains, n.skips),
        spec,
        (
            tuple(True for _ in net.weights) if "weights" in chosen else spec.weights,
            True if "gains" in chosen and net.gains is not None else spec.gains,
            (tuple(a is not None for a in net.skips)
             if "skips" in chosen and net.skips is not None else spec.skips),
        ),
        is_leaf=lambda x: x is None,
    )


def parameters(net: ReLUNet):
    """The trained part of `net` (a `ReLUNet` with `None` for every fixed leaf)."""
    return eqx.filter(net, trainable(net))


def with_parameters(net: ReLUNet, params) -> ReLUNet:
    """`net` with its trained leaves replaced by those of `params`."""
    return eqx.combine(params, eqx.filter(net, trainable(net), inverse=True))


def from_layer_params(net: ReLUNet, per_layer: Sequence[LayerParams]):
    """Per-layer `LayerParams` (values, gradients, changes) gathered into the layout of
    `parameters(net)`."""
    out = jax.tree.map(lambda _: None, parameters(net))
    if "weights" in net.train:
        out = eqx.tree_at(lambda g: g.weights, out, tuple(p.weight for p in per_layer),
                          is_leaf=lambda x: x is None)
    if "gains" in net.train and net.gains is not None:
        out = eqx.tree_at(lambda g: g.gains, out, jnp.stack([p.gain for p in per_layer]),
                          is_leaf=lambda x: x is None)
    if "skips" in net.train and net.skips is not None:
        out = eqx.tree_at(lambda g: g.skips, out, tuple(p.skip for p in per_layer),
                          is_leaf=lambda x: x is None)
    return out


def to_layer_params(net: ReLUNet, params) -> tuple[LayerParams, ...]:
    """The inverse of `from_layer_params`: a `parameters(net)`-shaped pytree split per layer."""
    out = []
    for l, layer in enumerate(net.layers):
        out.append(LayerParams(
            weight=params.weights[l] if "weights" in layer.train else None,
            gain=params.gains[l] if "gains" in layer.train else None,
            skip=params.skips[l] if "skips" in layer.train else None,
        ))
    return tuple(out)


def structure_kwargs(structure, d: int, widths) -> dict:
    """`ReLUNet.init` keyword arguments of a structure given as `None`, a dict, or a function
    `(d, widths) -> dict` (what `sweep`, `depth_scaling` and `structure_study` accept)."""
    if structure is None:
        return {}
    kw = structure(d, tuple(widths)) if callable(structure) else dict(structure)
    bad = {"key", "in_dim", "widths", "out_dim", "parametrization", "dtype"} & set(kw)
    if bad:
        raise ValueError(f"`structure` may not set {sorted(bad)}: the caller sets them.")
    return kw


def neuron_balance(net: ReLUNet, weights=None) -> tuple:
    """`‖(W_l ⊙ M_l)[i, :]‖² − ‖(W_{l+1} ⊙ M_{l+1})[:, i]‖²` for the hidden units of layers
    l = 1..L−1 (`weights` default `net.weights`), `None` for a layer whose law a skip path on
    layer l or l+1 breaks. See `gramflow.diagnostics.balance`."""
    weights = net.weights if weights is None else weights
    layers = net.layers
    out = []
    for l in range(net.depth - 1):
        if layers[l].skip is not None or layers[l + 1].skip is not None:
            out.append(None)
            continue
        w_in = layers[l].masked(weights[l])
        w_out = layers[l + 1].masked(weights[l + 1])
        out.append(jnp.sum(w_in**2, axis=1) - jnp.sum(w_out**2, axis=0))
    return tuple(out)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value}.")
    return int(value)
