"""Structured layers `h_l = g_l s_l (W_l ⊙ M_l) z_{l-1} + α_l z_{l-1}`: the structure-aware
parts of the identities.

Every structure keeps the layer linear in `z_{l-1}` (positive homogeneity survives), so the
identities of DESIGN.md split into two kinds of pieces:

- **transport** — the forward pass, the pullback recursion (I1) and the hierarchies (I4)/(I5)
  only ever apply the layer map. They run unchanged with the *effective weights*
  `W̃_l = g_l s_l (W_l ⊙ M_l) + α_l I` and unit scales (`effective`).
- **local terms** — what the layer's own trainable parameters θ_l contribute: their gradient
  (I1), their kernel `K_l = J_{θ_l} J_{θ_l}ᵀ` (I2) and their velocity sources (I4)/(I5). All of
  them follow from the per-layer field product `E_lᵀ Z_{l-1}` and the linear change of the
  effective weights `dW̃_l = g_l s_l (dW_l ⊙ M_l) + dg_l s_l (W_l ⊙ M_l) + dα_l I`.

For an unstructured network every function here returns exactly what the plain code computes.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._mask import Mask
from ._network import ReLUNet


def _mask(net: ReLUNet, l: int) -> Mask | None:
    return None if net.masks is None else net.masks[l]


def _skip(net: ReLUNet, l: int):
    return None if net.skips is None else net.skips[l]


def masked_weight(net: ReLUNet, l: int, W=None):
    """`W_l ⊙ M_l` (or `W_l` for a dense layer)."""
    W = net.weights[l] if W is None else W
    m = _mask(net, l)
    return W if m is None else W * jnp.asarray(m.array, W.dtype)


def coefficient(net: ReLUNet, l: int):
    """`g_l s_l`, the factor in front of the masked weights of layer l."""
    s = net.scales[l]
    return s if net.gains is None else net.gains[l] * s


def effective(net: ReLUNet):
    """`(scales, weights)` for the transport code: `(s, W)` of a plain network, or unit hidden
    scales with `W̃_l = g_l s_l (W_l ⊙ M_l) + α_l I` (and `s_out`) for a structured one."""
    if not net.structured:
        return net.scales, net.weights
    L = net.depth
    Ws = []
    for l in range(L):
        W = coefficient(net, l) * masked_weight(net, l)
        a = _skip(net, l)
        Ws.append(W if a is None else W + a * jnp.eye(W.shape[0], dtype=W.dtype))
    scales = jnp.concatenate([jnp.ones((L,), net.scales.dtype), net.scales[-1:]])
    return scales, tuple(Ws)


# -- trainable parameters ------------------------------------------------------------------------

def trainable(net: ReLUNet, *, every: bool = False):
    """Filter spec (a pytree of bools shaped like `net`) of the trained leaves, or with
    `every=True` of the weights and every structure parameter, trained or not."""
    chosen = ("weights", "gains", "skips") if every else net.train
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


def parameters(net: ReLUNet):
    """The trained part of `net` (a `ReLUNet` with `None` for every fixed leaf)."""
    return eqx.filter(net, trainable(net))


def with_parameters(net: ReLUNet, params) -> ReLUNet:
    """`net` with its trained leaves replaced by those of `params`."""
    return eqx.combine(params, eqx.filter(net, trainable(net), inverse=True))


def parameter_gradients_from_fields(net: ReLUNet, Z, E):
    """Gradients of `L = ½ Σ r²` w.r.t. the trained parameters (I1) from the fields, as a
    `ReLUNet` shaped like `parameters(net)`. With `F_l = E_lᵀ Z_{l-1}` `(N_l, N_{l-1})`:

        ∂L/∂W_l = g_l s_l M_l ⊙ F_l,   ∂L/∂g_l = s_l Σ (W_l ⊙ M_l) ⊙ F_l,   ∂L/∂α_l = tr F_l.
    """
    F = tuple(e.T @ z for e, z in zip(E, Z))
    grads = jax.tree.map(jnp.zeros_like, parameters(net))
    if "weights" in net.train:
        gw = tuple(coefficient(net, l) * masked_weight(net, l, f) for l, f in enumerate(F))
        grads = eqx.tree_at(lambda g: g.weights, grads, gw)
    if "gains" in net.train:
        gg = jnp.stack([net.scales[l] * jnp.sum(masked_weight(net, l) * f) for l, f in enumerate(F)])
        grads = eqx.tree_at(lambda g: g.gains, grads, gg)
    if "skips" in net.train:
        ga = tuple(None if a is None else jnp.trace(f) for a, f in zip(net.skips, F))
        grads = eqx.tree_at(lambda g: g.skips, grads, ga, is_leaf=lambda x: x is None)
    return grads


def effective_change(net: ReLUNet, dparams):
    """`dW̃_l = g_l s_l (dW_l ⊙ M_l) + dg_l s_l (W_l ⊙ M_l) + dα_l I` for a change `dparams`
    (shaped like `parameters(net)`) of the trained parameters, to first order."""
    out = []
    for l in range(net.depth):
        W = net.weights[l]
        d = jnp.zeros_like(W)
        if "weights" in net.train:
            d = d + coefficient(net, l) * masked_weight(net, l, dparams.weights[l])
        if "gains" in net.train:
            d = d + dparams.gains[l] * net.scales[l] * masked_weight(net, l)
        if "skips" in net.train and net.skips[l] is not None:
            d = d + dparams.skips[l] * jnp.eye(W.shape[0], dtype=W.dtype)
        out.append(d)
    return tuple(out)


def neuron_balance(net: ReLUNet, weights=None) -> tuple:
    """`‖(W_l ⊙ M_l)[i, :]‖² − ‖(W_{l+1} ⊙ M_{l+1})[:, i]‖²` for the hidden units of layers
    l = 1..L−1 (`weights` default `net.weights`), `None` for a layer whose law a skip path on
    layer l or l+1 breaks. See `gramflow.diagnostics.balance`."""
    weights = net.weights if weights is None else weights
    skip = [_skip(net, l) is not None for l in range(net.depth)]
    out = []
    for l in range(net.depth - 1):
        if skip[l] or skip[l + 1]:
            out.append(None)
            continue
        w_in, w_out = masked_weight(net, l, weights[l]), masked_weight(net, l + 1, weights[l + 1])
        out.append(jnp.sum(w_in**2, axis=1) - jnp.sum(w_out**2, axis=0))
    return tuple(out)


# -- kernels -------------------------------------------------------------------------------------

def _outer(u, v):
    """`u_μ v_νᵀ` in the kernel layout: `(P, Q)` or `(P, Q, k, k)`."""
    return jnp.outer(u, v) if u.ndim == 1 else jnp.einsum("mi,nj->mnij", u, v)


def _unit_sum(D, x):
    """`Σ_n D[μ, ..., n] x[μ, n]`: a per-sample contraction over units, `(P,)` or `(P, k)`."""
    if D.ndim == 2:
        return jnp.sum(D * x, axis=-1)
    return jnp.einsum("pkn,pn->pk", D, x)


def _pad_unit(x):
    """Append a zero unit (index N) along the last axis, the target of padded indices."""
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, 1),))


def _biclique_groups(mask: Mask):
    """Bicliques grouped by size: a list of `(rows (n_b, r), cols (n_b, c))` index arrays."""
    groups: dict = {}
    for r, c in mask.bicliques:
        groups.setdefault((len(r), len(c)), []).append((r, c))
    return [(np.stack([r for r, _ in g]), np.stack([c for _, c in g])) for g in groups.values()]


_CHUNK_ELEMENTS = 2**24  # bound on the intermediates of a masked kernel, in elements
# Cost model of the two forms of a masked kernel, in units of one connection (P² flops of a
# large matrix product), measured on CPU at P = 512, widths 256 (benchmarks/structure.py): a
# biclique costs 0.8 (|R| + |C|) for its Grams plus 130 for its (P, P) temporaries (220 in
# the chunked loop used beyond _UNROLLED_BICLIQUES).
_BICLIQUE_GRAM, _BICLIQUE_OVERHEAD, _CHUNKED_OVERHEAD = 0.8, 130, 220
_UNROLLED_BICLIQUES = 32  # up to this many bicliques, one static product each


def masked_kernel(mask: Mask, Zi, Di, Zj, Dj):
    """`Σ_{i,j} M[i,j] Δ_i[μ,·,i] Δ_j[ν,·,i] Z_i[μ,j] Z_j[ν,j]` from the fields, no autodiff,
    in whichever of two exact forms costs less for the (static) mask:

    - Hadamard form: `Σ_b (Z_{C_b} Z'_{C_b}ᵀ) ⊙ (Δ_{R_b} Δ'_{R_b}ᵀ)` over the bicliques of the
      mask, O(P² Σ_b (|R_b| + |C_b|)) — few large blocks (block-diagonal pathways);
    - connection form: `Σ_c A_c A'_cᵀ` with one column per connection,
      `A[μ, (i,j)] = Δ[μ,i] Z[μ,j]`, in chunks of connections, O(P² nnz) as large matrix
      products — many small blocks (banded, random sparse).

    Shape `(P, Q)` or `(P, Q, k, k)`."""
    nnz = int(mask.array.sum())
    nb = len(mask.bicliques)
    overhead = _BICLIQUE_OVERHEAD if nb <= _UNROLLED_BICLIQUES else _CHUNKED_OVERHEAD
    cost = sum(_BICLIQUE_GRAM * (len(r) + len(c)) + overhead for r, c in mask.bicliques)
    if nnz < cost:
        return _connection_kernel(mask, Zi, Di, Zj, Dj)
    return _biclique_kernel(mask, Zi, Di, Zj, Dj)


def _connection_kernel(mask: Mask, Zi, Di, Zj, Dj):
    from ._kernels import coactivation
    from ._state import apply_mask

    rows, cols = np.nonzero(mask.array)
    P, Q = Zi.shape[0], Zj.shape[0]
    kk = 1 if Di.ndim == 2 else Di.shape[1]
    ch = int(max(1, min(rows.size, _CHUNK_ELEMENTS // ((P + Q) * kk))))
    pad = -rows.size % ch
    Zi, Zj, Di, Dj = (_pad_unit(x) for x in (Zi, Zj, Di, Dj))
    rows = np.concatenate([rows, np.full(pad, Di.shape[-1] - 1)]).reshape(-1, ch)
    cols = np.concatenate([cols, np.full(pad, Zi.shape[-1] - 1)]).reshape(-1, ch)

    def block(r, c):
        return coactivation(apply_mask(Zi[:, c], Di[..., r]), apply_mask(Zj[:, c], Dj[..., r]))

    if rows.shape[0] == 1:
        return block(rows[0], cols[0])

    def step(acc, rc):
        return acc + block(*rc), None

    zero = jnp.zeros((P, Q) + ((kk, kk) if Di.ndim == 3 else ()), Zi.dtype)
    return jax.lax.scan(step, zero, (jnp.asarray(rows), jnp.asarray(cols)))[0]


def _take(x, idx: np.ndarray):
    """`x[..., idx]` for static indices: a slice when they are contiguous."""
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return x[..., int(idx[0]):int(idx[0]) + idx.size]
    return x[..., idx]


def _biclique_kernel(mask: Mask, Zi, Di, Zj, Dj):
    from ._kernels import coactivation, gram, hadamard

    one = jnp.ones((), Zi.dtype)
    if len(mask.bicliques) <= _UNROLLED_BICLIQUES:
        return sum(hadamard(one, gram(_take(Zi, c), _take(Zj, c)),
                            coactivation(_take(Di, r), _take(Dj, r)))
                   for r, c in mask.bicliques)
    P, Q = Zi.shape[0], Zj.shape[0]
    kk = 1 if Di.ndim == 2 else Di.shape[1] ** 2
    Zi, Zj, Di, Dj = (_pad_unit(x) for x in (Zi, Zj, Di, Dj))
    n_in, n_out = Zi.shape[-1] - 1, Di.shape[-1] - 1
    total = 0
    for rows, cols in _biclique_groups(mask):
        n_b = rows.shape[0]
        ch = int(max(1, min(n_b, _CHUNK_ELEMENTS // (P * Q * kk))))
        pad = -n_b % ch
        rows = np.concatenate([rows, np.full((pad, rows.shape[1]), n_out)]).reshape(-1, ch, rows.shape[1])
        cols = np.concatenate([cols, np.full((pad, cols.shape[1]), n_in)]).reshape(-1, ch, cols.shape[1])

        def block(rc):
            r, c = rc
            return hadamard(one, gram(Zi[:, c], Zj[:, c]), coactivation(Di[..., r], Dj[..., r]))

        def chunk(acc, rc):
            return acc + jnp.sum(jax.vmap(block)(rc), axis=0), None

        zero = jnp.zeros((P, Q) + ((Di.shape[1],) * 2 if kk > 1 else ()), Zi.dtype)
        if rows.shape[0] == 1:
            total = total + chunk(zero, (rows[0], cols[0]))[0]
        else:
            total = total + jax.lax.scan(chunk, zero, (jnp.asarray(rows), jnp.asarray(cols)))[0]
    return total


def local_kernels(net: ReLUNet, Zi, Di, Zj=None, Dj=None) -> tuple:
    """Per-layer kernels `K_l = J_{θ_l} J_{θ_l}ᵀ` over the layer's trained parameters θ_l (I2),
    between samples `i` and `j` (default: the same). `Zi = (Z_0..Z_{L-1})`, `Di = Δ_1..Δ_L`.

    - weights: `(g_l s_l)² Σ_b (G_{l-1})_{C_b} ⊙ (Q_l)_{R_b}` (masked, see `masked_kernel`), or
      `(g_l s_l)² G_{l-1} ⊙ Q_l` for a dense layer — the plain `s_l² G_{l-1} ⊙ Q_l`;
    - gains: `u uᵀ`, `u_μ = s_l Δ_{l,μ} · ((W_l ⊙ M_l) z_{l-1,μ})` (rank one per output);
    - skips: `v vᵀ`, `v_μ = Δ_{l,μ} · z_{l-1,μ}`.

    Shapes `(P, Q)` or `(P, Q, k, k)`.
    """
    from ._kernels import coactivation, gram, hadamard

    Zj = Zi if Zj is None else Zj
    Dj = Di if Dj is None else Dj
    out = []
    for l, (zi, di, zj, dj) in enumerate(zip(Zi, Di, Zj, Dj)):
        c = coefficient(net, l)
        terms = []
        if "weights" in net.train:
            m = _mask(net, l)
            if m is None:
                terms.append(hadamard(c, gram(zi, zj), coactivation(di, dj)))
            else:
                terms.append(c**2 * masked_kernel(m, zi, di, zj, dj))
        if "gains" in net.train:
            Wm = net.scales[l] * masked_weight(net, l)
            terms.append(_outer(_unit_sum(di, zi @ Wm.T), _unit_sum(dj, zj @ Wm.T)))
        if "skips" in net.train and _skip(net, l) is not None:
            terms.append(_outer(_unit_sum(di, zi), _unit_sum(dj, zj)))
        out.append(sum(terms[1:], terms[0]))
    return tuple(out)


def dense_trace(c, z, d):
    """`tr(c² G ⊙ Q) = c² Σ_μ ‖z_μ‖² ‖Δ_μ‖²` (summed over outputs), O(P N): the trace of a
    dense layer's kernel."""
    return c**2 * jnp.sum(jnp.sum(z**2, -1) * jnp.sum((d**2).reshape(d.shape[0], -1), -1))


def local_traces(net: ReLUNet, Z, Delta):
    """`tr K_l` (summed over outputs) for each layer, O(P N_l N_{l-1}) at most, `(L,)`."""
    out = []
    for l, (z, d) in enumerate(zip(Z, Delta)):
        c = coefficient(net, l)
        tr = 0
        if "weights" in net.train:
            m = _mask(net, l)
            if m is None:
                tr = tr + dense_trace(c, z, d)
            else:
                d2 = (d**2).reshape(d.shape[0], -1, d.shape[-1]).sum(1)  # (P, N_l)
                tr = tr + c**2 * jnp.sum(d2 * ((z**2) @ jnp.asarray(m.array, z.dtype).T))
        if "gains" in net.train:
            tr = tr + jnp.sum(_unit_sum(d, z @ (net.scales[l] * masked_weight(net, l)).T) ** 2)
        if "skips" in net.train and _skip(net, l) is not None:
            tr = tr + jnp.sum(_unit_sum(d, z) ** 2)
        out.append(tr)
    return jnp.stack(out)


# -- velocities ------------------------------------------------------------------------------------

def local_sources(net: ReLUNet, Z, Delta, E, *, backward: bool = True):
    """Local velocity sources of the structured hierarchy under gradient flow (η = 1):
    `dθ = −∂L/∂θ`, `V_l = Z_{l-1} dW̃_lᵀ` (the k = l terms of I4) and
    `U_{l-1} = Δ_l dW̃_l` (the sources of I5; `None` unless `backward`). Returns
    `(V, U, dθ)`. With `E` built from any field `v` instead of `r`, `Σ_l Δ_l · V_l = −K v`
    (I2): `kernel_matvec` of a structured network."""
    dparams = jax.tree.map(jnp.negative, parameter_gradients_from_fields(net, Z, E))
    dW = effective_change(net, dparams)
    V = tuple(z @ w.T for z, w in zip(Z, dW))
    U = tuple(Delta[l] @ dW[l] for l in range(1, net.depth)) if backward else None
    return V, U, dparams
