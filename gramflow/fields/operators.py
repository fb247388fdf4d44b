"""Materialized Gram operators of the hierarchy (I4, I5), for inspecting small problems.

The engines never build these (I6): they apply the operators matrix-free from their
generators. Materialized, each operator has P²·N_l² entries.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._algebra import residual_weighted
from ..model.network import ReLUNet, check_inputs
from .state import effective_weights, fields
from .velocities import Velocities, check_transport, residual_rate

DEFAULT_MAX_BYTES = 2**30


def _check_size(net: ReLUNet, P: int, pairs, what: str, max_bytes: int | None) -> None:
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    item = net.dtype.itemsize
    need = sum(P * P * net.widths[l - 1] ** 2 * item for _, l in pairs)
    if need > max_bytes:
        raise ValueError(
            f"{what} would materialize {need:,} bytes ({need / 2**20:.1f} MiB) for P = {P} "
            f"and widths {net.widths}, above max_bytes = {max_bytes:,}. These operators are "
            "for inspecting small problems; the engines apply them matrix-free (I6). Pass "
            "fewer samples, or a larger `max_bytes` if the memory is really there."
        )


def _sandwich(W_out, D_mu, op, D_nu, W_in):
    """`W_out D_μ op_{μν} D_ν W_inᵀ` for all sample pairs: (P, P, n, n) → (P, P, m, m)."""
    masked = D_mu[:, None, :, None] * op * D_nu[None, :, None, :]
    return jnp.einsum("ia,mnab,jb->mnij", W_out, masked, W_in)


def _push_up(weights, D, op, k, l):
    """`𝔊^{k→l}`-style transport of an operator on layer k up to layer l (I4): the forward
    recursion `op ↦ W̃_m D_{m-1,μ} op D_{m-1,ν} W̃_mᵀ`, m = k+1..l (1-based layers)."""
    for m in range(k + 1, l + 1):
        op = _sandwich(weights[m - 1], D[m - 2], op, D[m - 2], weights[m - 1])
    return op


def _pull_down(weights, D, op, k, l):
    """`𝔐^{k→l}`-style transport of an operator on layer k down to layer l (I5): the backward
    recursion `op ↦ W̃_{m+1}ᵀ D_{m+1,ν} op D_{m+1,μ} W̃_{m+1}`, m = k−1..l."""
    for m in range(k - 1, l - 1, -1):
        W = weights[m]  # W̃_{m+1}
        op = _sandwich(W.T, D[m], op, D[m], W.T)
    return op


def _pushforward(weights, D, P, dtype):
    """The recursion of (I4) from masks and effective weights (`W̃_2..W̃_L` used)."""
    ops, L = {}, len(D)
    for k in range(1, L):
        n = D[k - 1].shape[-1]
        op = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (P, P, n, n))
        for l in range(k + 1, L + 1):
            op = _push_up(weights, D, op, l - 1, l)
            ops[(k, l)] = op
    return ops


def _pullback(weights, D, P, dtype):
    """The recursion of (I5) from masks and effective weights (`W̃_2..W̃_L` used)."""
    ops, L = {}, len(D)
    for k in range(2, L):
        n = D[k - 1].shape[-1]
        op = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (P, P, n, n))
        for l in range(k - 1, 0, -1):
            op = _pull_down(weights, D, op, l + 1, l)
            ops[(k, l)] = op
    return ops


def operator_pairs(depth: int) -> tuple[tuple[str, int, int], ...]:
    """`("pushforward", k, l)` for 1 ≤ k < l ≤ L, then `("pullback", k, l)` for
    1 ≤ l < k ≤ L−1: the order of the `"operator_drift"` observable."""
    push = [("pushforward", k, l) for k in range(1, depth) for l in range(k + 1, depth + 1)]
    pull = [("pullback", k, l) for k in range(2, depth) for l in range(k - 1, 0, -1)]
    return tuple(push + pull)


def all_operators(weights, D, P, dtype) -> list:
    """Every operator of the hierarchy, in the order of `operator_pairs`."""
    return [*_pushforward(weights, D, P, dtype).values(), *_pullback(weights, D, P, dtype).values()]


def operator_bytes(net: ReLUNet, P: int) -> int:
    """Bytes of all materialized operators of `net` on P samples."""
    item, w = net.dtype.itemsize, net.widths
    return sum(P * P * w[l - 1] ** 2 * item for _, _, l in operator_pairs(net.depth))


def pushforward_operators(
    net: ReLUNet, X: Float[Array, "P d"], *, max_bytes: int | None = None
) -> dict[tuple[int, int], Float[Array, "P P N_l N_l"]]:
    """Pushforward Gram operators `𝔊^{k→l}_{μν} = J^h_{l←k,μ} (J^h_{l←k,ν})ᵀ` (I4), by the
    forward recursion `𝔊^{k→l} = s_l² W_l D_{l-1,μ} 𝔊^{k→l-1} D_{l-1,ν} W_lᵀ`, `𝔊^{k→k} = I`.

    **Arguments:** `net`; `X` of shape `(P, d)`; `max_bytes`: refuse (with a `ValueError`
    giving the bytes needed) above this size (default 1 GiB).

    **Returns:** dict keyed by `(k, l)`, 1 ≤ k < l ≤ L (1-based layers), each
    of shape `(P, P, N_l, N_l)`. The identity operators k = l are not stored. For a
    structured network `s_l W_l` is its effective weight `W̃_l` (`ReLUNet`).
    """
    X, _ = check_inputs(net, X)
    L, P = net.depth, X.shape[0]
    pairs = [(k, l) for _, k, l in operator_pairs(L) if k < l]
    _check_size(net, P, pairs, "pushforward_operators", max_bytes)
    _, _, D, _, _, _ = fields(net, X)
    return _pushforward(effective_weights(net), D, P, X.dtype)


def pullback_operators(
    net: ReLUNet, X: Float[Array, "P d"], *, max_bytes: int | None = None
) -> dict[tuple[int, int], Float[Array, "P P N_l N_l"]]:
    """Pullback Gram operators `𝔐^{k→l}_{μν} = (J^z_{k←l,μ})ᵀ J^z_{k←l,ν}` (I5), by the
    backward recursion `𝔐^{k→l} = s_{l+1}² W_{l+1}ᵀ D_{l+1,μ} 𝔐^{k→l+1} D_{l+1,ν} W_{l+1}`,
    `𝔐^{k→k} = I`. The first instance, `s² W_{l+1}ᵀ D_{l+1,μ} D_{l+1,ν} W_{l+1}`, is a metric
    on layer l induced by the weights above it. With ReLU's positive homogeneity
    (`z_k = J^z_{k←l} z_l`) these are exact; biases or other activations break that.

    **Arguments:** as `pushforward_operators`.

    **Returns:** dict keyed by `(k, l)`, 1 ≤ l < k ≤ L−1, each of shape `(P, P, N_l, N_l)`.
    """
    X, _ = check_inputs(net, X)
    L, P = net.depth, X.shape[0]
    pairs = [(k, l) for _, k, l in operator_pairs(L) if k > l]
    _check_size(net, P, pairs, "pullback_operators", max_bytes)
    _, _, D, _, _, _ = fields(net, X)
    return _pullback(effective_weights(net), D, P, X.dtype)


def block_operator(op: Float[Array, "P P N N"]) -> Float[Array, "PN PN"]:
    """The `(P·N, P·N)` block operator with entry `[(μ, a), (ν, b)] = op[μ, ν, a, b]`."""
    P, N = op.shape[0], op.shape[2]
    return op.transpose(0, 2, 1, 3).reshape(P * N, P * N)


class OperatorSummary(eqx.Module):
    """Spectral summary of one materialized Gram operator `(P, P, N, N)`.

    **Fields:**

    - `spectrum`: eigenvalues of the block operator (`block_operator`), descending,
      `(P·N,)`; it is a Gram matrix of per-sample Jacobians, so positive semi-definite.
    - `block_spectra`: eigenvalues of the diagonal blocks `op[μ, μ]`, descending, `(P, N)`.
    - `block_singular_values`: singular values of every block `op[μ, ν]`, `(P, P, N)`.
    - `locality`: `‖op − 𝟙 ⊗ I‖_F / ‖𝟙 ⊗ I‖_F`, the distance from the layer-local
      (identity, `k = l`) operator.
    """

    spectrum: Float[Array, " PN"]
    block_spectra: Float[Array, "P N"]
    block_singular_values: Float[Array, "P P N"]
    locality: Float[Array, ""]


def operator_summary(op: Float[Array, "P P N N"]) -> OperatorSummary:
    """Spectra of a materialized operator and its distance from the layer-local identity."""
    P, N = op.shape[0], op.shape[2]
    diag = op[jnp.arange(P), jnp.arange(P)]
    local = jnp.broadcast_to(jnp.eye(N, dtype=op.dtype), op.shape)
    return OperatorSummary(
        spectrum=jnp.linalg.eigvalsh(block_operator(op))[::-1],
        block_spectra=jnp.linalg.eigvalsh(diag)[:, ::-1],
        block_singular_values=jnp.linalg.svd(op, compute_uv=False),
        locality=jnp.linalg.norm((op - local).ravel()) / jnp.linalg.norm(local.ravel()),
    )


def hierarchy_velocities(
    net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"], *,
    transport: int | None = None, max_bytes: int | None = None,
) -> Velocities:
    """The velocities of `velocities`, computed from materialized operators by the formulas of
    (I4) and (I5) as written (η = 1), for small problems:

        dH_{l,μ} = −Σ_{k≤l} Σ_ν [J^h_{l←k,μ} κ_k[μ,ν] J^h_{l←k,ν}ᵀ] E_{l,ν}
        dB_{l,μ} = −Σ_{l≤k<L} Σ_ν Z_{l,ν}ᵀ [J^z_{k←l,ν}ᵀ λ_{k+1}[ν,μ] J^z_{k←l,μ}]

    with `E_l = Σ_i r_i Δ_l[i]`, the brackets built by the recursions of `𝔊^{k→l}` and
    `𝔐^{k→l}` started from each layer's local operators (`Layer.forward_operator`,
    `Layer.backward_operator`). For a dense layer `κ_k = s_k² G_{k-1}[μ,ν] I` and
    `λ_{k+1} = s_{k+1}² (E_{k+1,ν} · Δ_{k+1,μ}) I`, so the brackets are
    `s_k² G_{k-1}[μ,ν] 𝔊^{k→l}_{μν}` and `s_{k+1}² (Δ_{k+1,μ} · E_{k+1,ν}) 𝔐^{k→l}_{νμ}` —
    (I4), (I5) verbatim; masks, gains and skips change only the local operators. Agreement
    with the matrix-free `velocities` is the check of (I6). `transport=n` drops the terms
    with `l − k > n` (resp. `k − l > n`), the truncation of `TruncatedTransport(n)`.
    """
    X, y = check_inputs(net, X, y)
    n_max = check_transport(transport)
    P, L = X.shape[0], net.depth
    _check_size(net, P, [(k, l) for _, k, l in operator_pairs(L)] + [(l, l) for l in
                range(1, L + 1)], "hierarchy_velocities", max_bytes)
    _, Z, D, _, Delta, f = fields(net, X)
    r = f - y
    W = effective_weights(net)
    E = tuple(residual_weighted(r, d) for d in Delta)
    layers = net.layers
    kappa = [layer.forward_operator(z) for layer, z in zip(layers, Z)]
    dH = []
    for l in range(1, L + 1):
        total = jnp.zeros_like(E[l - 1])
        for k in range(1, l + 1):
            if n_max is not None and l - k > n_max:
                continue
            op = _push_up(W, D, kappa[k - 1], k, l)
            total -= jnp.einsum("mnab,nb->ma", op, E[l - 1])
        dH.append(total)
    lam = [None, *(layer.backward_operator(e, d) for layer, e, d in zip(layers[1:], E[1:], Delta[1:]))]
    dB = []
    for l in range(1, L + 1):
        total = jnp.zeros_like(Delta[l - 1])
        for k in range(l, L):  # source U_k from layer k + 1, pulled down to layer l
            if n_max is not None and k - l > n_max:
                continue
            op = lam[k]
            if op.ndim == 4:
                op = _pull_down(W, D, op, k, l)
                total -= jnp.einsum("na,nmab->mb", Z[l], op)
            else:
                op = jax.vmap(lambda o, k=k: _pull_down(W, D, o, k, l))(op)
                total -= jnp.einsum("na,inmab->mib", Z[l], op)
        dB.append(total)
    dr = residual_rate(Delta, _local_sources(kappa, E))
    return Velocities(r=dr, H=tuple(dH), B=tuple(dB))


def _local_sources(kappa, E):
    """The local sources `V_k = −Σ_ν κ_k[μ,ν] E_{k,ν}` from materialized local operators."""
    return tuple(-jnp.einsum("mnab,nb->ma", op, e) for op, e in zip(kappa, E))
