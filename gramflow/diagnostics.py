"""Diagnostics: pure functions of a network, state or trajectory.

Started with the balance laws of homogeneous networks; the rest of the structured-
representations diagnostics (spectral sensitivity, fixed points, robustness) is to come.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_net
from ._network import ReLUNet


def balance(net: ReLUNet) -> tuple[Float[Array, " N_l"], ...]:
    """Per-neuron balance `‖W_l[i, :]‖² − ‖W_{l+1}[:, i]‖²` of hidden units i of layers
    l = 1..L−1 (incoming minus outgoing squared weight norms).

    Gradient flow conserves each of them (Du, Hu & Lee 2018): rescaling a unit's incoming
    weights by c > 0 and its outgoing weights by 1/c leaves f unchanged because ReLU is
    positively homogeneous (the layer scales s_l do not matter), so
    `⟨w_in, ∂L/∂w_in⟩ = ⟨w_out, ∂L/∂w_out⟩` and both norms change at the same rate. Units
    of the last hidden layer have no such law here: their outgoing weights are the fixed
    readout, so only their incoming norm moves.

    **Returns:** tuple of `(N_l,)` arrays, l = 1..L−1 (empty for one hidden layer).
    """
    check_net(net)
    return tuple(
        jnp.sum(w_in**2, axis=1) - jnp.sum(w_out**2, axis=0)
        for w_in, w_out in zip(net.weights[:-1], net.weights[1:])
    )
