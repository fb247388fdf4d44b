"""Diagnostics: pure functions of a network, state or trajectory.

So far: the balance laws of homogeneous networks and the spectral sensitivity of the kernels;
fixed points and robustness (issue 8) are to come.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_inputs, check_net
from ._engines import _with_weights
from ._kernels import layer_kernels
from ._network import ReLUNet
from ._observables import flat_kernel


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


class Sensitivity(eqx.Module):
    """Top eigenvalues of the collective kernel and of each layer kernel, with their
    derivatives. Row 0 is `K`, row l is `K_l` (l = 1..L).

    **Fields:** `values` `(L+1, m)` descending; `weights`: tuple over layers of
    `(L+1, m, N_l, N_{l-1})`, `∂λ/∂W_l`; `inputs` `(L+1, m, P, d)`, `∂λ/∂X`.
    """

    values: Float[Array, "Lp1 m"]
    weights: tuple[Float[Array, "Lp1 m n_out n_in"], ...]
    inputs: Float[Array, "Lp1 m P d"]


def eigenvalue_sensitivity(net: ReLUNet, X: Float[Array, "P d"], *, m: int = 1) -> Sensitivity:
    """Spectral sensitivity: derivatives of the top-`m` eigenvalues of `K` and of every
    `K_l = s_l² G_{l-1} ⊙ Q_l` (I2) with respect to the weights and the inputs, by reverse-mode
    autodiff through `layer_kernels` and `eigh` (valid where those eigenvalues are simple).

    **Returns:** a `Sensitivity`.
    """
    X, _ = check_inputs(net, X)
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"`m` must be a positive int, got {m!r}.")

    def top(weights, X):
        lk = layer_kernels(_with_weights(net, weights), X)
        kernels = (lk.total, *lk.K)
        return jnp.stack([jnp.linalg.eigvalsh(flat_kernel(K))[::-1][:m] for K in kernels])

    d_weights, d_inputs = jax.jacrev(top, argnums=(0, 1))(net.weights, X)
    return Sensitivity(values=top(net.weights, X), weights=tuple(d_weights), inputs=d_inputs)
