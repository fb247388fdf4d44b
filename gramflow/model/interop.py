"""Conversion between gramflow's networks and `equinox.nn.MLP`.

gramflow's identities hold for bias-free networks with a positively homogeneous activation
and a fixed readout. An `eqx.nn.MLP` is such a network when it has no biases, ReLU hidden
activations and an identity final activation; its last `Linear` becomes the fixed readout.
Layouts differ only in the readout: equinox stores the last layer as `(k, N_L)` (or `(1, N_L)`
for `out_size="scalar"`), gramflow as `a` of shape `(N_L, k)` (or `(N_L,)`) with
`f = s_out Z_L a`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

_PROBE = np.array([-1e3, -7.0, -0.5, 0.0, 0.5, 3.0, 7.0, 1e3])


def _is_relu(fn) -> bool:
    """`fn` is ReLU with relu'(0) = 0, the convention every identity uses."""
    if fn is jax.nn.relu:
        return True
    try:
        x = jnp.asarray(_PROBE)
        same = bool(jnp.array_equal(fn(x), jnp.maximum(x, 0.0)))
        return same and float(jax.grad(lambda t: fn(t))(0.0)) == 0.0
    except Exception:  # noqa: BLE001 -- anything that cannot act on a probe is not ReLU
        return False


def _is_identity(fn) -> bool:
    try:
        x = jnp.asarray(_PROBE)
        return bool(jnp.array_equal(fn(x), x))
    except Exception:  # noqa: BLE001
        return False


def mlp_arrays(mlp) -> tuple[list, jax.Array, bool]:
    """The hidden weights `[W_1, ..., W_L]` (equinox's `(N_l, N_{l-1})` layout, which is
    gramflow's), the last layer's weight `(k, N_L)`, and whether the output is scalar — or a
    `TypeError`/`ValueError` that says why the MLP is outside what gramflow describes."""
    if not isinstance(mlp, eqx.nn.MLP):
        raise TypeError(f"`mlp` must be an equinox.nn.MLP, got {type(mlp).__name__}.")
    if mlp.depth < 1:
        raise ValueError("`mlp` has depth 0 (no hidden layer); gramflow trains hidden layers "
                         "under a fixed readout, so it needs depth >= 1.")
    with_bias = [i for i, layer in enumerate(mlp.layers) if layer.bias is not None]
    if with_bias:
        raise ValueError(
            f"`mlp` has biases (layers {with_bias}). gramflow's identities need a bias-free "
            "network: biases break the positive homogeneity the pullback hierarchy (I5) rests "
            "on. Build it with `eqx.nn.MLP(..., use_bias=False, use_final_bias=False)`.")
    if not _is_relu(mlp.activation):
        raise ValueError(
            f"`mlp.activation` must be ReLU (jax.nn.relu), got {mlp.activation!r}: the "
            "identities need a positively homogeneous activation with relu'(0) = 0.")
    if not _is_identity(mlp.final_activation):
        raise ValueError(
            "`mlp.final_activation` must be the identity: the output is the linear readout "
            f"f = s_out Z_L a, got {mlp.final_activation!r}.")
    if mlp.in_size == "scalar":
        raise ValueError("`mlp` has in_size='scalar'; gramflow's inputs are (P, d) arrays: "
                         "build it with in_size=1 and pass X of shape (P, 1).")
    weights = [layer.weight for layer in mlp.layers[:-1]]
    return weights, mlp.layers[-1].weight, mlp.out_size == "scalar"


def build_mlp(hidden, last, scalar: bool):
    """An `eqx.nn.MLP` (no biases, ReLU) whose hidden layers apply the `(N_l, N_{l-1})`
    matrices `hidden` and whose last layer applies `last` `(k, N_L)`."""
    widths = {w.shape[0] for w in hidden}
    if len(widths) != 1:
        raise ValueError(
            f"equinox.nn.MLP has one hidden width, but this network's widths are "
            f"{tuple(w.shape[0] for w in hidden)}; only equal-width networks convert.")
    mlp = eqx.nn.MLP(
        in_size=hidden[0].shape[1], out_size="scalar" if scalar else last.shape[0],
        width_size=hidden[0].shape[0], depth=len(hidden), activation=jax.nn.relu,
        use_bias=False, use_final_bias=False, dtype=last.dtype, key=jax.random.key(0))
    return eqx.tree_at(lambda m: [layer.weight for layer in m.layers], mlp, [*hidden, last])
