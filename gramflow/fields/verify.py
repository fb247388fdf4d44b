"""Verification layer: every collective quantity against autodiff of a plain weight-space function."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._algebra import apply_kernel
from ..model.network import ReLUNet, check_inputs, trainable
from .kernels import collective_kernel, layer_kernels
from .state import collective_state, parameter_gradients, pullback_gradients

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 1e-1, "float16": 1e-2}
_JACOBIAN_BYTES_LIMIT = 2**31


def _plain_f(net, X, eps_h=None, eps_z=None):
    """The network as a plain function of its parameters, written independently of
    `gramflow/fields/state.py` and `gramflow/model/layer.py`:
    `h_l = g_l s_l (W_l ⊙ M_l) z_{l-1} + α_l z_{l-1}`.

    `eps_h[l]` / `eps_z[l]` are additive probes on the pre-/post-activations of layer l + 1:
    since `f_μ` depends only on row μ of each probe, `∂(Σ_μ f_μ)/∂eps_h[l] = Δ_{l+1}` and
    `∂(Σ_μ f_μ)/∂eps_z[l] = B_{l+1}`.
    """
    z, hs = X, []
    for l, W in enumerate(net.weights):
        if net.masks is not None and net.masks[l] is not None:
            W = jnp.where(net.masks[l].array, W, 0.0)
        h = net.scales[l] * jnp.dot(z, W.T)
        if net.gains is not None:
            h = net.gains[l] * h
        if net.skips is not None and net.skips[l] is not None:
            h = h + net.skips[l] * z
        if eps_h is not None:
            h = h + eps_h[l]
        hs.append(h)
        z = jax.nn.relu(h)
        if eps_z is not None:
            z = z + eps_z[l]
    return net.scales[-1] * jnp.dot(z, net.readout), hs


def _rel(a, b):
    """Relative Frobenius error `‖a − b‖ / ‖b‖` (0 when both vanish)."""
    num = jnp.linalg.norm((a - b).ravel())
    den = jnp.linalg.norm(b.ravel())
    return num / jnp.maximum(den, jnp.finfo(b.dtype).tiny)


def _sample_jacobian(fn, probes):
    """`∂f_μ/∂probe[μ]` for per-sample probes: `(P, N)` or, for vector f, `(P, k, N)`."""
    jac = jax.jacrev(lambda p: jnp.sum(fn(p), axis=0))(probes)
    return tuple(j if j.ndim == 2 else jnp.moveaxis(j, 0, 1) for j in jac)


def _split_gains(params):
    """`params` with the `(L,)` gains array as a tuple of per-layer scalars, so that every
    trained leaf sits at an index `l` of a per-layer sequence (`weights[l]`, `gains[l]`,
    `skips[l]`)."""
    if params.gains is None:
        return params
    return eqx.tree_at(lambda p: p.gains, params, tuple(params.gains))


def _join_gains(params):
    if params.gains is None or not isinstance(params.gains, tuple):
        return params
    return eqx.tree_at(lambda p: p.gains, params, jnp.stack(params.gains))


def _by_layer(tree, L: int, lead: int = 0):
    """The leaves of a split parameter tree grouped by layer, each flattened after its first
    `lead` axes and concatenated: a list of L arrays `(*lead_shape, #θ_l)`."""
    groups = [[] for _ in range(L)]
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        l = next(key.idx for key in path if isinstance(key, jax.tree_util.SequenceKey))
        groups[l].append(leaf.reshape(leaf.shape[:lead] + (-1,)))
    return [jnp.concatenate(g, axis=-1) if g else None for g in groups]


def _jjt(J, P):
    """`J Jᵀ` reshaped to the kernel layout: `(P, P)` or `(P, P, k, k)`."""
    K = J @ J.T
    k = J.shape[0] // P
    if J.shape[0] == P:
        return K
    return K.reshape(P, k, P, k).transpose(0, 2, 1, 3)


def _weights_or_none(grads, L):
    return tuple(grads.weights) if grads.weights is not None else (None,) * L


class VerificationReport(eqx.Module):
    """Relative errors `‖ours − autodiff‖_F / ‖autodiff‖_F` of every collective quantity.

    **Fields** (tuples are per layer, l = 1..L):

    - `H`: forward fields vs the plain forward pass.
    - `B`, `Delta`: conjugate fields vs `jax.jacrev` of `Σ_μ f_μ` w.r.t. probes added to `Z_l`
      and `H_l`.
    - `gradients`: pullback gradients (I1) vs `jax.grad` of `½ Σ r²`, per layer over all
      its trained parameters (`parameter_gradients`: weights, and a structured layer's gain
      and skip; and `pullback_gradients` for the weights), the larger error of the two.
    - `K`: per-layer kernels `K_l` vs `J_l J_lᵀ` with `J_l = ∂f/∂θ_l` from `jax.jacrev` (I2).
    - `kernel`: `collective_kernel` vs `J Jᵀ`.
    - `residual_velocity`: `−K r` vs `jax.jvp` of `f` along `−∇L` (I2 with η = 1).
    - `dtype`: the network's dtype, which sets the default tolerance of `ok`.
    """

    H: tuple[Float[Array, ""], ...]
    B: tuple[Float[Array, ""], ...]
    Delta: tuple[Float[Array, ""], ...]
    gradients: tuple[Float[Array, ""], ...]
    K: tuple[Float[Array, ""], ...]
    kernel: Float[Array, ""]
    residual_velocity: Float[Array, ""]
    dtype: str = eqx.field(static=True)

    def rows(self) -> dict[str, list[float]]:
        """Each quantity's errors as Python floats (the maximum over any batch axis)."""
        names = ["H", "B", "Delta", "gradients", "K", "kernel", "residual_velocity"]
        out = {}
        for name in names:
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            out[name] = [float(np.max(np.asarray(v))) for v in values]
        return out

    @property
    def max_error(self) -> float:
        """Largest relative error in the report."""
        return float(np.max([e for v in self.rows().values() for e in v]))  # NaN propagates

    def ok(self, rtol: float | None = None) -> bool:
        """Whether every error is at most `rtol` (default: 1e-10 for float64, 1e-4 for
        float32). NaN errors fail."""
        rtol = DEFAULT_RTOL.get(self.dtype, 1e-4) if rtol is None else rtol
        return bool(self.max_error <= rtol)

    def __str__(self) -> str:
        L = len(self.H)
        head = ["quantity"] + [f"layer {l}" for l in range(1, L + 1)] + ["max"]
        lines = []
        for name, values in self.rows().items():
            per_layer = [f"{v:.2e}" for v in values] if len(values) == L else [""] * L
            lines.append([name, *per_layer, f"{max(values):.2e}"])
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(L + 2)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        rule = "-" * (sum(widths) + 2 * (L + 1))
        rtol = DEFAULT_RTOL.get(self.dtype, 1e-4)
        verdict = "ok" if self.ok() else "FAILED"
        return "\n".join(
            [
                f"gramflow verification ({self.dtype}; relative errors vs autodiff)",
                fmt.format(*head),
                rule,
                *(fmt.format(*r) for r in lines),
                rule,
                f"max error {self.max_error:.2e}: {verdict} at rtol {rtol:g}",
            ]
        )


def verify(
    net: ReLUNet, X: Float[Array, "P d"], y: Float[Array, "P *k"]
) -> VerificationReport:
    """Check fields (I1), pullback gradients (I1), kernels and the residual flow (I2) against
    autodiff of an independent plain function of the weights.

    Builds full Jacobians `∂f/∂W_l`, O(P·k·Σ N_l N_{l-1}) memory: meant for small problems
    (refuses above 2 GiB; subsample `X`). Works under `jax.jit` and `jax.vmap`.

    **Arguments:** `net`; `X` of shape `(P, d)`; `y` of shape `(P,)` or `(P, k)`.

    **Returns:** a `VerificationReport`; `report.ok()` tells whether all errors are within the
    dtype's tolerance and `print(report)` shows the table.
    """
    X, y = check_inputs(net, X, y)
    P, k = X.shape[0], net.out_dim or 1
    params, rest = eqx.partition(net, trainable(net))
    n_params = sum(p.size for p in jax.tree.leaves(params))
    need = P * k * n_params * net.dtype.itemsize
    if need > _JACOBIAN_BYTES_LIMIT:
        raise ValueError(
            f"verify would build Jacobians of {need / 2**30:.1f} GiB (P·k·#parameters = "
            f"{P}·{k}·{n_params}), above the {_JACOBIAN_BYTES_LIMIT / 2**30:.0f} GiB limit; "
            "pass a subset of the samples, e.g. `verify(net, X[:64], y[:64])`."
        )
    state = collective_state(net, X, y)
    grads = parameter_gradients(net, X, y)
    weight_grads = pullback_gradients(net, X, y)
    kernels = layer_kernels(net, X)
    K = collective_kernel(net, X)

    def f_of(p):
        return _plain_f(eqx.combine(_join_gains(p), rest), X)[0]

    split = _split_gains(params)
    L = net.depth

    _, H_ref = _plain_f(net, X)
    zeros = tuple(jnp.zeros_like(h) for h in H_ref)
    Delta_ref = _sample_jacobian(lambda e: _plain_f(net, X, eps_h=e)[0], zeros)
    B_ref = _sample_jacobian(lambda e: _plain_f(net, X, eps_z=e)[0], zeros)
    grads_ref = jax.grad(lambda p: 0.5 * jnp.sum((f_of(p) - y) ** 2))(split)
    jac = jax.tree.map(lambda j: j.reshape(P * k, -1), jax.jacrev(f_of)(split))
    J = _by_layer(jac, L, lead=1)
    zero = jnp.zeros((P, P) + ((k, k) if net.out_dim is not None else ()), net.dtype)
    K_ref = [zero if j is None else _jjt(j, P) for j in J]
    _, df = jax.jvp(f_of, (split,), (jax.tree.map(jnp.negative, grads_ref),))
    ours, ref = _by_layer(_split_gains(grads), L), _by_layer(grads_ref, L)
    tiny = jnp.zeros((), net.dtype)

    return VerificationReport(
        H=tuple(_rel(a, b) for a, b in zip(state.H, H_ref)),
        B=tuple(_rel(a, b) for a, b in zip(state.B, B_ref)),
        Delta=tuple(_rel(a, b) for a, b in zip(state.Delta, Delta_ref)),
        gradients=tuple(
            jnp.maximum(tiny if b is None else _rel(a, b),
                        tiny if gw is None else _rel(weight_grads[l], gw))
            for l, (a, b, gw) in enumerate(zip(ours, ref, _weights_or_none(grads_ref, L)))),
        K=tuple(_rel(a, b) for a, b in zip(kernels.K, K_ref)),
        kernel=jnp.maximum(_rel(K, sum(K_ref)), _rel(kernels.total, sum(K_ref))),
        residual_velocity=_rel(-apply_kernel(K, state.r), df),
        dtype=jnp.dtype(net.dtype).name,
    )
