r"""The hidden layer: the unit of gramflow's mathematics.

A layer maps `z_{l-1}` to `h_l = W̃_l z_{l-1}` with the *effective weight*

$$\tilde W_l = g_l\, s_l\, (W_l \odot M_l) + \alpha_l I,$$

a dense layer being the case `M_l = 1`, `g_l = 1`, `α_l = 0` (no skip). Every option keeps the
layer linear in `z_{l-1}`, so the network stays positively homogeneous and every identity
splits into two kinds of pieces:

- **transport** — the forward pass, the pullback recursion (I1) and the cross-layer terms of
  (I4)/(I5) only apply `W̃_l`;
- **local terms** — what the layer's own trained parameters θ_l do: their gradient (I1) read
  off the field product `E_lᵀ Z_{l-1}`, their kernel `K_l = J_{θ_l} J_{θ_l}ᵀ` (I2), and the
  change `dW̃_l` they cause under a gradient step, applied to any field from the right
  (`push`: `Z' dW̃ᵀ`, the sources of I4 and the mixed-Gram terms of I8) or from the left
  (`pull`: `Δ' dW̃`, the sources of I5 and of the backward map of I8).

Everything in gramflow that touches a layer goes through these few methods.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._algebra import (
    coactivation,
    dense_trace,
    gram,
    gram_apply,
    hadamard,
    masked_kernel,
    outer,
    unit_sum,
)
from .._cost import CostModel
from .._mask import Mask

TRAINABLE = ("weights", "gains", "skips")


def generators(layers) -> tuple:
    """`(None, W̃_2, ..., W̃_L)`: the effective weights that generate the Gram operators of
    (I4)/(I5) (`W̃_1` never enters them)."""
    return (None, *(layer.effective() for layer in layers[1:]))


# Entries of `E(V)` `(P, m, N_l)` above which `Layer.matmat` works in blocks of samples.
MATMAT_BLOCK_ELEMENTS = 2**23


def _sample_blocks(P: int, width: int, block_size: int | None) -> tuple[int, int]:
    """`(nb, b)`: `nb` blocks of `b` samples (`nb · b ≥ P`, the rest zero padding) for
    `Layer.matmat`, `width = m · N_l` entries per sample. Automatic: one block up to
    `MATMAT_BLOCK_ELEMENTS` entries; beyond, a divisor `nb` of P (no padding) of at least the
    needed count, preferring blocks whose size has many factors 2 (so that it divides evenly
    over the devices of a sharded sample axis)."""
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
        nb = -(-P // block_size)
        return (1, P) if nb == 1 else (nb, block_size)
    if P * width <= MATMAT_BLOCK_ELEMENTS:
        return 1, P
    need = -(-P * width // MATMAT_BLOCK_ELEMENTS)
    divisors = [nb for nb in range(need, min(4 * need, P) + 1) if P % nb == 0]
    if divisors:
        nb = max(divisors, key=lambda nb: (min(_twos(P // nb), 6), -nb))
        return nb, P // nb
    b = -(-P // need)
    b = -(-b // 8) * 8
    return -(-P // b), b


def _twos(b: int) -> int:
    return (b & -b).bit_length() - 1


def _blocked_matmat(gather, spread, nb: int, b: int, z, d, V):
    """`spread(Z, Δ, Σ_blocks gather(Z_b, Δ_b, V_b))` over `nb` blocks of `b` samples; block j
    holds samples j, j + nb, j + 2 nb, … (a strided slice: on a sharded sample axis each device
    keeps its own rows of every block)."""
    P = V.shape[0]
    pad = nb * b - P

    def split(x):  # (P, ...) -> (b, nb, ...)
        if pad:
            x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(b, nb, *x.shape[1:])

    zs, ds, Vs = split(z), split(d), split(V)

    def take(x, j):
        return jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)

    def block(j):
        return take(zs, j), take(ds, j), take(Vs, j)

    F0 = jax.eval_shape(gather, *block(0))
    F = jax.lax.fori_loop(0, nb, lambda j, F: F + gather(*block(j)),
                          jnp.zeros(F0.shape, F0.dtype))

    def put(j, out):
        zb, db, _ = block(j)
        return jax.lax.dynamic_update_index_in_dim(out, spread(zb, db, F), j, axis=1)

    out = jax.lax.fori_loop(0, nb, put, jnp.zeros((b, nb) + V.shape[1:], V.dtype))
    return out.reshape(nb * b, *V.shape[1:])[:P]


class LayerParams(eqx.Module):
    """Values (or gradients, or changes) of a layer's trained parameters; `None` for what the
    layer does not train. `weight` `(N_l, N_{l-1})`, `gain` and `skip` scalars."""

    weight: Array | None = None
    gain: Array | None = None
    skip: Array | None = None


class Layer(eqx.Module):
    """One hidden layer `h = W̃ z`, `W̃ = g s (W ⊙ M) + α I` (see the module docstring).

    **Fields:** `weight` `W` `(N_l, N_{l-1})` (`None` where a dynamics must not read it: the
    weight-free first layer of the collective engine); `scale` `s_l`; `gain` `g_l` or `None`
    (1); `skip` `α_l` or `None` (no skip path); static `mask` (`Mask` or `None`: dense),
    `train` (what this layer trains, a subset of `("weights", "gains", "skips")` whose
    parameters exist) and `shape` `(N_l, N_{l-1})`.
    """

    weight: Float[Array, "n_out n_in"] | None
    scale: Float[Array, ""]
    gain: Float[Array, ""] | None = None
    skip: Float[Array, ""] | None = None
    mask: Mask | None = eqx.field(static=True, default=None)
    train: tuple[str, ...] = eqx.field(static=True, default=("weights",))
    shape: tuple[int, int] = eqx.field(static=True, default=(0, 0))

    def __check_init__(self):
        if self.weight is not None and tuple(self.weight.shape[-2:]) != tuple(self.shape):
            raise ValueError(f"`shape` must be the weight's shape {tuple(self.weight.shape[-2:])}, "
                             f"got {self.shape}; pass shape=W.shape.")
        if min(self.shape) < 1:
            raise ValueError(f"`shape` (N_l, N_(l-1)) must be positive, got {self.shape}.")

    @property
    def coefficient(self) -> Float[Array, ""]:
        """`g_l s_l`, the factor in front of the masked weights."""
        return self.scale if self.gain is None else self.gain * self.scale

    def masked(self, W: Float[Array, "n_out n_in"] | None = None):
        """`W ⊙ M` (of the layer's weight, or of any matrix of its shape)."""
        W = self.weight if W is None else W
        return W if self.mask is None else W * jnp.asarray(self.mask.array, W.dtype)

    def effective(self) -> Float[Array, "n_out n_in"]:
        """`W̃ = g s (W ⊙ M) + α I`."""
        W = self.coefficient * self.masked()
        if self.skip is None:
            return W
        return W + self.skip * jnp.eye(W.shape[0], dtype=W.dtype)

    def params(self) -> LayerParams:
        """The trained parameters."""
        return LayerParams(
            weight=self.weight if "weights" in self.train else None,
            gain=self.gain if "gains" in self.train else None,
            skip=self.skip if "skips" in self.train else None,
        )

    def replace(self, params: LayerParams) -> Layer:
        """This layer with its trained parameters set to `params`."""
        return Layer(
            weight=params.weight if "weights" in self.train else self.weight,
            scale=self.scale,
            gain=params.gain if "gains" in self.train else self.gain,
            skip=params.skip if "skips" in self.train else self.skip,
            mask=self.mask, train=self.train, shape=self.shape,
        )

    # -- local terms: gradients, changes, sources ------------------------------------------------

    def gradients(self, E: Float[Array, "P n_out"], Z: Float[Array, "P n_in"], *,
                  weights: bool = True) -> LayerParams:
        """`∂L/∂θ` of `L = ½ Σ r²` (I1) from the residual-weighted field `E_l` and `Z_{l-1}`:
        with `F = E_lᵀ Z_{l-1}`,

            ∂L/∂W = g s M ⊙ F,   ∂L/∂g = s Σ (W ⊙ M) ⊙ F,   ∂L/∂α = tr F.

        `weights=False` skips the weight gradient (the engines accumulate `W_1` differently).
        """
        return LayerParams(
            weight=(self.coefficient * self.masked(E.T @ Z)
                    if weights and "weights" in self.train else None),
            gain=(self.scale * jnp.sum(E * (Z @ self.masked().T))
                  if "gains" in self.train else None),
            skip=jnp.sum(E * Z) if "skips" in self.train else None,
        )

    def change(self, d: LayerParams) -> Float[Array, "n_out n_in"]:
        """`dW̃ = g s (dW ⊙ M) + dg s (W ⊙ M) + dα I`, linear in a change `d` of θ."""
        out = jnp.zeros(self.shape, self.scale.dtype)
        if d.weight is not None:
            out = out + self.coefficient * self.masked(d.weight)
        if d.gain is not None:
            out = out + d.gain * self.scale * self.masked()
        if d.skip is not None:
            out = out + d.skip * jnp.eye(self.shape[0], dtype=out.dtype)
        return out

    def _descent(self, E, Z):
        """Gain and skip changes `dθ = −∂L/∂θ` (η = 1); the weight part stays matrix-free."""
        g = self.gradients(E, Z, weights=False)
        neg = lambda x: None if x is None else -x  # noqa: E731
        return neg(g.gain), neg(g.skip)

    def push(self, Zp: Float[Array, "Q n_in"], Z: Float[Array, "P n_in"],
             E: Float[Array, "P n_out"], *, gram_pz: Float[Array, "Q P"] | None = None):
        """`Z' dW̃ᵀ`, shape `(Q, N_l)`: the change of `W̃` under the flow direction
        `dθ = −∂L/∂θ` built from `(E, Z)` (η = 1), applied to the fields `Z'` of any sites.

        For `Z' = Z` this is the local source `V_l` of (I4); times η it is the mixed-Gram term
        of the exact map (I8) (and, for spectator sites, of I9). The weight part is never
        formed as a matrix where a Gram is cheaper: `−(gs)² (Z' Zᵀ) E` for a dense layer
        (`gram_pz = Z' Zᵀ` if already known), `−(gs)² Z' (M ⊙ Eᵀ Z)ᵀ` for a masked one.
        """
        c = self.coefficient
        out = jnp.zeros((Zp.shape[0], self.shape[0]), Zp.dtype)
        if "weights" in self.train:
            if self.mask is not None:
                out = out - c**2 * (Zp @ self.masked(E.T @ Z).T)
            elif gram_pz is not None:
                out = out - c**2 * (gram_pz @ E)
            else:
                out = out - c**2 * gram_apply(Zp, Z, E)
        dg, da = self._descent(E, Z)
        if dg is not None:
            out = out + dg * self.scale * (Zp @ self.masked().T)
        if da is not None:
            out = out + da * Zp
        return out

    def pull(self, Dp: Float[Array, "Q *k n_out"], E: Float[Array, "P n_out"],
             Z: Float[Array, "P n_in"]):
        """`Δ' dW̃`, shape `(Q, *k, N_{l-1})`: the same change of `W̃` applied from the left,
        to conjugate fields `Δ'`. For `Δ' = Δ_l` the local source `U_{l-1}` of (I5); times η
        the mixed-Gram term of the backward map of (I8)."""
        c = self.coefficient
        out = jnp.zeros(Dp.shape[:-1] + (self.shape[1],), Dp.dtype)
        if "weights" in self.train:
            if self.mask is not None:
                out = out - c**2 * (Dp @ self.masked(E.T @ Z))
            else:
                out = out - c**2 * gram_apply(Dp, E, Z)
        dg, da = self._descent(E, Z)
        if dg is not None:
            out = out + dg * self.scale * (Dp @ self.masked())
        if da is not None:
            out = out + da * Dp
        return out

    # -- local kernel ----------------------------------------------------------------------------

    def kernel(self, zi, di, zj=None, dj=None, *, cost: CostModel | None = None):
        """`K_l = J_θ J_θᵀ` between sites i and j (default: the same) over the layer's trained
        parameters (I2), from `Z_{l-1}` and `Δ_l`; `(P, Q)` or `(P, Q, k, k)`:

        - weights: `(gs)² G_{l-1} ⊙ Q_l` (dense), or `(gs)² Σ_b (G_{l-1})_{C_b} ⊙ (Q_l)_{R_b}`
          over the bicliques of the mask (`masked_kernel`);
        - gain: `u uᵀ`, `u_μ = s Δ_{l,μ} · ((W ⊙ M) z_{l-1,μ})`;
        - skip: `v vᵀ`, `v_μ = Δ_{l,μ} · z_{l-1,μ}`.
        """
        zj = zi if zj is None else zj
        dj = di if dj is None else dj
        K = jnp.zeros((zi.shape[0], zj.shape[0]) + (di.shape[1:2] * 2 if di.ndim == 3 else ()),
                      zi.dtype)
        if "weights" in self.train:
            if self.mask is None:
                K = K + hadamard(self.coefficient, gram(zi, zj), coactivation(di, dj))
            else:
                cost = CostModel.default() if cost is None else cost
                K = K + self.coefficient**2 * masked_kernel(self.mask, zi, di, zj, dj, cost)
        if "gains" in self.train:
            Wm = self.scale * self.masked()
            K = K + outer(unit_sum(di, zi @ Wm.T), unit_sum(dj, zj @ Wm.T))
        if "skips" in self.train:
            K = K + outer(unit_sum(di, zi), unit_sum(dj, zj))
        return K

    def trace(self, z, d) -> Float[Array, ""]:
        """`tr K_l` (summed over outputs), O(P N_l N_{l-1}) at most, never forming K_l."""
        tr = jnp.zeros((), z.dtype)
        if "weights" in self.train:
            if self.mask is None:
                tr = tr + dense_trace(self.coefficient, z, d)
            else:
                d2 = (d**2).reshape(d.shape[0], -1, d.shape[-1]).sum(1)  # (P, N_l)
                M = jnp.asarray(self.mask.array, z.dtype)
                tr = tr + self.coefficient**2 * jnp.sum(d2 * ((z**2) @ M.T))
        if "gains" in self.train:
            tr = tr + jnp.sum(unit_sum(d, z @ (self.scale * self.masked()).T) ** 2)
        if "skips" in self.train:
            tr = tr + jnp.sum(unit_sum(d, z) ** 2)
        return tr

    def matmat(self, z, d, V, *, block_size: int | None = None):
        """`K_l V` for a block of vectors `V` `(P, *k, m)` without forming `K_l`: per part of
        the layer, two large products (`Zᵀ E(V)`, then `Z ·`), all m columns side by side (the
        residual rate of I2 with V in place of r, batched). Returns `(P, *k, m)`.

        The weight part is done in blocks of samples when `E(V)` `(P, m, N_l)` would be large
        (more than `MATMAT_BLOCK_ELEMENTS` entries; `block_size` samples per block when given):
        first `Zᵀ E` `(N_{l-1}, m N_l)` summed over blocks, then `Z (Zᵀ E)` block by block, so
        that memory stays O(P (N_{l-1} + N_l) + block · m · N_l). A block is every `nb`-th
        sample (a strided slice), so that under a sharding of the sample axis every device
        holds its share of each block and the result stays sharded like `V`."""
        P, m = V.shape[0], V.shape[-1]
        scalar = d.ndim == 2
        out = jnp.zeros_like(V)
        if "weights" in self.train:
            M = None if self.mask is None else jnp.asarray(self.mask.array, z.dtype)

            def gather(zb, db, Vb):  # Zᵀ E of a block: (N_{l-1}, m·N_l) or (m, N_l, N_{l-1})
                if scalar:
                    E = Vb[:, :, None] * db[:, None, :]  # (b, m, N_l)
                else:
                    E = jnp.einsum("pkm,pkn->pmn", Vb, db)
                if M is None:  # G_{l-1} E_l, never forming G
                    return zb.T @ E.reshape(zb.shape[0], -1)
                return jnp.einsum("pmn,pj,nj->mnj", E, zb, M)  # M ⊙ Eᵀ Z per column

            def spread(zb, db, F):  # Z (Zᵀ E) of a block, contracted with Δ: (b, *k, m)
                if M is None:
                    U = (zb @ F).reshape(zb.shape[0], m, -1)
                else:
                    U = jnp.einsum("pj,mnj->pmn", zb, F)
                return jnp.einsum("pn,pmn->pm", db, U) if scalar else jnp.einsum(
                    "pkn,pmn->pkm", db, U)

            nb, b = _sample_blocks(P, m * self.shape[0], block_size)
            if nb == 1:
                term = spread(z, d, gather(z, d, V))
            else:
                term = _blocked_matmat(gather, spread, nb, b, z, d, V)
            out = out + self.coefficient**2 * term
        for part in ("gains", "skips"):
            if part in self.train:
                x = z @ (self.scale * self.masked()).T if part == "gains" else z
                u = unit_sum(d, x)  # (P, *k)
                uv = jnp.tensordot(u, V, axes=u.ndim)  # (m,)
                out = out + u[..., None] * uv.reshape((1,) * u.ndim + (-1,))
        return out

    # -- local operators (materialized; small problems only) -------------------------------------

    def forward_operator(self, z: Float[Array, "P n_in"]) -> Float[Array, "P P n_out n_out"]:
        """`κ_l[μ,ν] = J_θ(μ) J_θ(ν)ᵀ` `(P, P, N_l, N_l)`, with `J_θ(μ) = ∂h_{l,μ}/∂θ_l`: the
        local operator of (I4), `V_{l,μ} = −Σ_ν κ_l[μ,ν] E_{l,ν}`. For a dense layer
        `(g_l s_l)² G_{l-1}[μ,ν] I` (`s_l² G_{l-1}[μ,ν] I` without a gain); a mask makes it diagonal `(gs)² Σ_j M_aj z_μj z_νj`, a gain adds
        `u_μ u_νᵀ` (`u = s (W ⊙ M) z`), a skip `z_μ z_νᵀ`."""
        P, n = z.shape[0], self.shape[0]
        op = jnp.zeros((P, P, n, n), z.dtype)
        if "weights" in self.train:
            M = jnp.ones(self.shape, z.dtype) if self.mask is None else jnp.asarray(
                self.mask.array, z.dtype)
            diag = self.coefficient**2 * jnp.einsum("mj,nj,aj->mna", z, z, M)
            op = op + jnp.einsum("mna,ab->mnab", diag, jnp.eye(n, dtype=z.dtype))
        for part in ("gains", "skips"):
            if part in self.train:
                u = z @ (self.scale * self.masked()).T if part == "gains" else z
                op = op + jnp.einsum("ma,nb->mnab", u, u)
        return op

    def backward_operator(self, E: Float[Array, "P n_out"], Delta: Float[Array, "P *k n_out"]):
        """`λ_l[ν,μ]_{ab} = Σ_θ (E_ν · ∂_θW̃_{:,a}) (Δ_μ · ∂_θW̃_{:,b})`, shape
        `(P, P, N_{l-1}, N_{l-1})` (`(k, P, P, N_{l-1}, N_{l-1})` for vector outputs): the local
        operator of (I5), `U_{l-1,μ} = −Σ_ν z_{l-1,ν}ᵀ λ_l[ν,μ]`. For a dense layer
        `(g_l s_l)² (E_ν · Δ_μ) I`."""
        n = self.shape[1]
        D = Delta if Delta.ndim == 3 else Delta[:, None]
        M = jnp.ones(self.shape, E.dtype) if self.mask is None else jnp.asarray(
            self.mask.array, E.dtype)
        op = jnp.zeros((D.shape[1], E.shape[0], D.shape[0], n, n), E.dtype)
        if "weights" in self.train:
            diag = self.coefficient**2 * jnp.einsum("nr,mir,ra->inma", E, D, M)
            op = op + jnp.einsum("inma,ab->inmab", diag, jnp.eye(n, dtype=E.dtype))
        for part in ("gains", "skips"):
            if part in self.train:
                W = self.scale * self.masked() if part == "gains" else jnp.eye(n, dtype=E.dtype)
                op = op + jnp.einsum("na,mib->inmab", E @ W, D @ W)
        return op if Delta.ndim == 3 else op[0]
