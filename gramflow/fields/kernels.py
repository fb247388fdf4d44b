"""Layer-wise kernels `K_l = s_l² G_{l-1} ⊙ Q_l` and the collective kernel (I2, I3), on the
training set or between two sets of sites (I9)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._algebra import coactivation, gram, transpose_samples
from .._cost import CostModel
from ..model.network import ReLUNet, check_inputs
from .state import fields


class LayerKernels(eqx.Module):
    """The layer-wise decomposition of the collective kernel (I2).

    **Fields** (tuples over layers, l = 1..L):

    - `G`: forward Grams `G_0 = X Xᵀ, G_1, ..., G_{L-1}`, each `(P, P)`.
    - `Q`: co-activation matrices `Q_1..Q_L`, `Q_l = Δ_l Δ_lᵀ`: `(P, P)` or `(P, P, k, k)`.
    - `K`: per-layer kernels `K_l = s_l² G_{l-1} ⊙ Q_l`, shaped like `Q_l`. For a structured
      layer, `K_l = J_{θ_l} J_{θ_l}ᵀ` over all its trained parameters θ_l: the masked
      weight term `(g_l s_l)² Σ_b (G_{l-1})_{C_b} ⊙ (Q_l)_{R_b}` over the bicliques of the
      mask, plus rank-one terms for a trained gain and a trained skip (`Layer.kernel`).
    - `total`: `K = Σ_l K_l`, the empirical NTK over the trained parameters.
    - `nngp`: `None` for a finite network; for `limit_kernels`, the covariance of the outputs
      at initialization (the NNGP kernel), shaped like `total`.

    With two sets of sites (`X2`), every matrix is `(P, Q)` (or `(P, Q, k, k)`).
    """

    G: tuple[Float[Array, "P P"], ...]
    Q: tuple[Float[Array, "P P *kk"], ...]
    K: tuple[Float[Array, "P P *kk"], ...]
    total: Float[Array, "P P *kk"]
    nngp: Float[Array, "P P *kk"] | None = None


def local_kernels(net: ReLUNet, Zi, Di, Zj=None, Dj=None, *, cost: CostModel | None = None):
    """`K_l` of every layer between sites i and j (default: the same), from `Z_0..Z_{L-1}`
    and `Δ_1..Δ_L`: `Layer.kernel`."""
    Zj = Zi if Zj is None else Zj
    Dj = Di if Dj is None else Dj
    return tuple(layer.kernel(zi, di, zj, dj, cost=cost)
                 for layer, zi, di, zj, dj in zip(net.layers, Zi, Di, Zj, Dj))


def layer_kernels(
    net: ReLUNet, X: Float[Array, "P d"], X2: Float[Array, "Q d"] | None = None, *,
    cost: CostModel | None = None,
) -> LayerKernels:
    """Per-layer kernels `K_l = s_l² G_{l-1} ⊙ Q_l` and their sum (I2; for L = 1, I3), on
    the training set or, with `X2`, between two sets of sites (I9).

    Cost O(P² Σ_l N_l) after one forward and one pullback pass; no Jacobian is formed.

    **Arguments:** `net`; `X` of shape `(P, d)`; `X2`: `None` (the kernel of `X` with itself)
    or other inputs `(Q, d)` — test points, say — for the cross kernels
    `K_l(X, X2) = s_l² G_{l-1}(X, X2) ⊙ Q_l(X, X2)`, Grams and co-activations with rows from
    `X` and columns from `X2` (equal to `J_l(X) J_l(X2)ᵀ`); `cost`: a `CostModel` (default:
    the backend's) for the choice between exact forms of a masked layer's kernel.

    **Returns:** a `LayerKernels`; kernels are `(P, P)` for scalar output and `(P, P, k, k)`
    for vector outputs (the neural-tangents layout), so that
    `dr_{μi}/dt = −η Σ_{νj} K[μ,ν,i,j] r_{νj}`; with `X2`, `(P, Q)` or `(P, Q, k, k)`.
    """
    X, _ = check_inputs(net, X)
    _, Z, _, _, Delta, _ = fields(net, X)
    if X2 is None:
        Z2, Delta2 = Z, Delta
    else:
        X2, _ = check_inputs(net, X2)
        _, Z2, _, _, Delta2, _ = fields(net, X2)
    G = tuple(gram(z, z2) for z, z2 in zip(Z[:-1], Z2[:-1]))
    Q = tuple(coactivation(d, d2) for d, d2 in zip(Delta, Delta2))
    K = local_kernels(net, Z[:-1], Delta, Z2[:-1], Delta2, cost=cost)
    return LayerKernels(G=G, Q=Q, K=K, total=sum(K[1:], K[0]))


def collective_kernel(
    net: ReLUNet, X: Float[Array, "P d"], X2: Float[Array, "Q d"] | None = None, *,
    block_size: int | None = None, cost: CostModel | None = None,
) -> Float[Array, "P P *kk"]:
    """The collective kernel `K = Σ_l s_l² G_{l-1} ⊙ Q_l` (I2), equal to `J Jᵀ` with
    `J = ∂f/∂θ` over the trained parameters.

    **Arguments:** `net`; `X` of shape `(P, d)`; `X2`: `None`, or other inputs `(Q, d)` for
    the cross kernel `K(X, X2) = J(X) J(X2)ᵀ` (I9); `block_size`: fill K in tiles of
    `block_size` samples, recomputing the fields of two blocks per tile, for when the
    `(P, P)` kernel fits in memory but the fields `(P, Σ N_l)` of all samples do not
    (default `None`: one pass over all samples). `cost`: a `CostModel` (default: the
    backend's) — when K is assembled from its upper block triangle, and which exact form a
    masked layer uses. For products `K v` or the top spectrum without forming K at all, see
    `kernel_matvec` and `kernel_eigs`.

    **Returns:** `K` of shape `(P, P)` (scalar output) or `(P, P, k, k)` (vector outputs);
    with `X2`, `(P, Q)` or `(P, Q, k, k)`.
    """
    X, _ = check_inputs(net, X)
    if X2 is not None:
        X2, _ = check_inputs(net, X2)
    cost = CostModel.default() if cost is None else cost
    if block_size is None:
        _, Z, _, _, Delta, _ = fields(net, X)
        if X2 is not None:
            _, Z2, _, _, Delta2, _ = fields(net, X2)
            return _kernel_tile(net, Z, Delta, Z2, Delta2, cost)
        if _use_triangle(X.shape[0], net, cost):
            return _symmetric_kernel(net, Z, Delta, cost)
        return _kernel_tile(net, Z, Delta, Z, Delta, cost)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
    X2 = X if X2 is None else X2
    rows = _sample_axis(X)
    if rows is None:
        return _tiled_kernel(net, X, X2, block_size, cost)
    # X sharded along samples: each device fills its own rows of K, tile by tile, against
    # all of X2 (gathered: (Q, d) inputs, not fields), so K comes back sharded like X.
    mesh, axis = rows
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(
        lambda x, x2: _tiled_kernel(net, x, x2, block_size, cost), mesh=mesh,
        in_specs=(spec(axis), spec()), out_specs=spec(axis))(X, X2)


def _sample_axis(X):
    """`(mesh, axis name)` when `X` is a concrete array sharded along its samples over
    several devices (a `NamedSharding` whose first axis is split), else `None`."""
    sharding = getattr(X, "sharding", None)
    if isinstance(X, jax.core.Tracer) or not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,)
    if spec[0] is None or len(sharding.device_set) < 2:
        return None
    return sharding.mesh, spec[0]


def _tiled_kernel(net, X, X2, block_size: int, cost: CostModel):
    """K (or the cross kernel) in tiles of `block_size` samples: one block row at a time,
    one tile at a time within it, recomputing the fields of the two blocks per tile."""
    P, Q = X.shape[0], X2.shape[0]

    def blocks(A):
        n = -(-A.shape[0] // block_size)
        return jnp.pad(A, ((0, n * block_size - A.shape[0]), (0, 0))).reshape(n, block_size, -1)

    Xb, X2b = blocks(X), blocks(X2)

    def block_fields(x):
        _, Z, _, _, Delta, _ = fields(net, x)
        return Z, Delta

    def row(xi):
        Zi, Di = block_fields(xi)

        def tile(xj):
            Zj, Dj = block_fields(xj)
            return _kernel_tile(net, Zi, Di, Zj, Dj, cost)

        return jax.lax.map(tile, X2b)

    tiles = jax.lax.map(row, Xb)  # (nb, nb2, b, b, *kk)
    K = jnp.moveaxis(tiles, 2, 1).reshape(Xb.shape[0] * block_size, X2b.shape[0] * block_size,
                                          *tiles.shape[4:])
    return K[:P, :Q]


def _use_triangle(P: int, net, cost: CostModel) -> bool:
    """Block-triangular Gram products pay off when P spans several blocks and the layers are
    wide enough for the halved matmuls to outweigh assembling K (`CostModel`)."""
    sizes = (net.in_dim, *net.widths)
    mean_gram_width = sum(a + b for a, b in zip(sizes[:-1], sizes[1:])) / net.depth
    return P >= 2 * cost.triangle_block and mean_gram_width >= cost.triangle_min_width


def _symmetric_kernel(net, Z, Delta, cost: CostModel):
    """K from its block-upper triangle: block row i holds the tiles (i, j ≥ i), so the Gram
    products cost about half of the full ones; the tiles below the diagonal are transposes of
    those above (K is symmetric), and K is written once, by concatenation."""
    block = cost.triangle_block
    P = Z[0].shape[0]
    nb = -(-P // block)
    pad = nb * block - P
    Z = tuple(jnp.pad(z, ((0, pad), (0, 0))) for z in Z)
    Delta = tuple(jnp.pad(d, ((0, pad),) + ((0, 0),) * (d.ndim - 1)) for d in Delta)
    rows = []  # block row i: the tiles (i, j) for j ≥ i, (block, (nb − i) block, *kk)
    for i in range(nb):
        lo, hi = i * block, (i + 1) * block
        rows.append(_kernel_tile(net, tuple(z[lo:hi] for z in Z),
                                 tuple(d[lo:hi] for d in Delta),
                                 tuple(z[lo:] for z in Z), tuple(d[lo:] for d in Delta), cost))
    K = jnp.concatenate([
        jnp.concatenate([transpose_samples(rows[j][:, (i - j) * block:(i - j + 1) * block])
                         for j in range(i)] + [rows[i]], axis=1)
        for i in range(nb)], axis=0)
    return K[:P, :P]


def _kernel_tile(net, Zi, Di, Zj, Dj, cost: CostModel):
    """`Σ_l K_l` between two sets of sites."""
    return sum(local_kernels(net, Zi[:-1], Di, Zj[:-1], Dj, cost=cost))
