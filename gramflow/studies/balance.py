"""Balance laws: per-neuron quantities conserved by gradient flow in homogeneous networks."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ..model.network import ReLUNet, check_net, neuron_balance


def balance(net: ReLUNet) -> tuple[Float[Array, " N_l"] | None, ...]:
    """Per-neuron balance `‖W_l[i, :]‖² − ‖W_{l+1}[:, i]‖²` of hidden units i of layers
    l = 1..L−1 (incoming minus outgoing squared weight norms, of the masked weights
    `W ⊙ M` for a masked layer).

    Gradient flow conserves each of them (Du, Hu & Lee 2018): rescaling a unit's incoming
    weights by c > 0 and its outgoing weights by 1/c leaves f unchanged because ReLU is
    positively homogeneous (the scales s_l and gains g_l do not matter; a mask is kept), so
    `⟨w_in, ∂L/∂w_in⟩ = ⟨w_out, ∂L/∂w_out⟩` and both norms change at the same rate. Units
    of the last hidden layer have no such law here: their outgoing weights are the fixed
    readout, so only their incoming norm moves. A skip path on layer l or l+1 carries
    `α z` past the rescaled weights and breaks the law for the units of layer l: their entry
    is `None`.

    **Returns:** tuple of `(N_l,)` arrays (or `None`), l = 1..L−1 (empty for L = 1). Along a
    run, the observable `"balance_drift"` of `simulate` / `flow` records how far each layer's
    laws have moved from t = 0.
    """
    check_net(net)
    if "weights" not in net.train:
        return (None,) * (net.depth - 1)
    return neuron_balance(net)


def gain_balance(net: ReLUNet) -> Float[Array, " L"]:
    """Per-layer balance `g_l² − ‖W_l ⊙ M_l‖_F²` of a network with trained gains and weights:
    conserved by gradient flow, since `(g_l, W_l) → (g_l / c, c W_l)` leaves f unchanged.

    **Returns:** `(L,)`.
    """
    check_net(net)
    if net.gains is None or not {"gains", "weights"} <= set(net.train):
        raise ValueError("gain_balance needs a network whose gains and weights are both trained "
                         "(`ReLUNet.init(..., gains=1.0)`).")
    return jnp.stack([net.gains[l] ** 2 - jnp.sum(net.layers[l].masked() ** 2)
                      for l in range(net.depth)])
