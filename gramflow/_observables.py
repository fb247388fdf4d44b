"""What a trajectory records: functions of the fields at one time."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._algebra import coactivation, flat_kernel
from ._network import neuron_balance

#: name -> (shape per record, description); `L` hidden layers, `m` = `top_m`.
OBSERVABLES = {
    "loss": ("()", "½ Σ r² (always recorded)"),
    "r": ("(P,) or (P, k)", "residual"),
    "kernel_trace": ("(L,)", "tr K_l per layer"),
    "kernel_share": ("(L,)", "tr K_l / tr K"),
    "active_fraction": ("(L,)", "fraction of active units, mean of D_l"),
    "kernel_eigs": ("(m,)", "top-m eigenvalues of K, descending"),
    "layer_kernel_eigs": ("(L, m)", "top-m eigenvalues of each K_l"),
    "kernel_drift": ("()", "‖K(t) − K(0)‖_F / ‖K(0)‖_F"),
    "condition_number": ("()", "λ_max(K) / λ_min(K)"),
    "alignment": ("()", "kernel–target alignment ⟨y, K y⟩ / (‖K‖_F ‖y‖²)"),
    "coactivation_drift": ("(L,)", "‖Q_l(t) − Q_l(0)‖_F / ‖Q_l(0)‖_F"),
    "kernel": ("(P, P) or (P, P, k, k)", "the full kernel K (per-record matrices: memory!)"),
    "balance_drift": (
        "(L,)",
        "max_i |b_i(t) − b_i(0)| of the per-neuron balance laws of layers 1..L−1 "
        "(gramflow.diagnostics.balance; NaN where a skip path breaks them, and for layer L, "
        "whose outgoing weights are the fixed readout); not for FrozenKernel",
    ),
    "operator_drift": (
        "(n_pairs,)",
        "‖𝔊(t) − 𝔊(0)‖_F / ‖𝔊(0)‖_F per Gram operator, in the order of "
        "gramflow.operator_pairs(L); materializes them: small problems only",
    ),
}
DEFAULT_OBSERVABLES = ("loss", "r", "kernel_trace", "kernel_share", "active_fraction")
# Observables that need the (P, P) kernels rather than O(P N) field reductions.
_NEEDS_LAYER_KERNELS = {"layer_kernel_eigs", "coactivation_drift"}
_NEEDS_KERNEL = {"kernel_eigs", "kernel_drift", "alignment", "kernel", "condition_number"}
_NEEDS_KERNEL |= _NEEDS_LAYER_KERNELS
FIELD_FREE = ("loss", "r")  # what an engine that carries only r can record


class View(eqx.Module):
    """The fields an observable may read; `H`, `Z`, `D`, `Delta` are `None` for engines that
    carry only the residual. `layers` are the current `Layer`s (their local kernels; the
    first may hold no weight matrix, see the collective engine), `weights` the effective
    weights generating the Gram operators (`W̃_1` may be `None`), `op_masks` the masks
    generating them if not `D`, and `net` the current network when the engine has it whole."""

    r: Float[Array, "P *k"]
    H: tuple | None = None
    Z: tuple | None = None
    D: tuple | None = None
    Delta: tuple | None = None
    layers: tuple | None = None
    weights: tuple | None = None
    op_masks: tuple | None = None
    net: eqx.Module | None = None


def _rel_drift(A, A0):
    return jnp.linalg.norm((A - A0).ravel()) / jnp.linalg.norm(A0.ravel())


def _top(K, m):
    return jnp.linalg.eigvalsh(flat_kernel(K))[::-1][:m]


class Reference(eqx.Module):
    """Quantities at t = 0 that drift observables compare against."""

    K: Array | None
    Q: tuple | None
    y: Array
    ops: list | None = None
    balance: tuple | None = None


def _balance_of(view: View):
    if view.net is None:
        raise ValueError(
            "observable 'balance_drift' needs every weight matrix, but this engine does not "
            "carry W_1 (the collective engine never needs it): record it with gf.Weights()."
        )
    return neuron_balance(view.net)


def _balance_drift(view: View, ref: Reference):
    out = []
    for b, b0 in zip(_balance_of(view), ref.balance):
        out.append(jnp.nan if b is None else jnp.max(jnp.abs(b - b0)))
    out.append(jnp.nan)  # the last hidden layer: its outgoing weights are the fixed readout
    return jnp.stack([jnp.asarray(v, view.r.dtype) for v in out])


def _operators_of(view: View):
    from ._operators import all_operators

    D = view.D if view.op_masks is None else view.op_masks
    return all_operators(view.weights, D, view.r.shape[0], view.r.dtype)


def reference(view: View, y, names) -> Reference:
    K, Q, ops = None, None, None
    if {"kernel_drift"} & set(names):
        K = _kernels_of(view)[1]
    if "coactivation_drift" in names:
        Q = tuple(coactivation(d) for d in view.Delta)
    if "operator_drift" in names:
        ops = _operators_of(view)
    balance = _balance_of(view) if "balance_drift" in names else None
    return Reference(K=K, Q=Q, y=y, ops=ops, balance=balance)


def _kernels_of(view: View):
    Ks = tuple(layer.kernel(z, d) for layer, z, d in zip(view.layers, view.Z, view.Delta))
    return Ks, sum(Ks[1:], Ks[0])


def observe(view: View, ref: Reference, names, top_m: int) -> dict[str, Array]:
    """Evaluate the observables `names` (keys of `OBSERVABLES`) on one view."""
    out = {"loss": 0.5 * jnp.sum(view.r**2)}
    if "r" in names:
        out["r"] = view.r
    if {"kernel_trace", "kernel_share"} & set(names):
        tr = jnp.stack([layer.trace(z, d)
                        for layer, z, d in zip(view.layers, view.Z, view.Delta)])
        if "kernel_trace" in names:
            out["kernel_trace"] = tr
        if "kernel_share" in names:
            out["kernel_share"] = tr / jnp.sum(tr)
    if "balance_drift" in names:
        out["balance_drift"] = _balance_drift(view, ref)
    if "active_fraction" in names:
        out["active_fraction"] = jnp.stack([jnp.mean(d) for d in view.D])
    if "operator_drift" in names:
        ops = _operators_of(view)
        drifts = [_rel_drift(op, op0) for op, op0 in zip(ops, ref.ops)]
        out["operator_drift"] = jnp.stack(drifts) if drifts else jnp.zeros((0,), view.r.dtype)
    if _NEEDS_KERNEL & set(names):
        Ks, K = _kernels_of(view)
        if "kernel" in names:
            out["kernel"] = K
        if {"kernel_eigs", "condition_number"} & set(names):
            ev = jnp.linalg.eigvalsh(flat_kernel(K))  # once for both
            if "kernel_eigs" in names:
                out["kernel_eigs"] = ev[::-1][:top_m]
            if "condition_number" in names:
                out["condition_number"] = ev[-1] / ev[0]
        if "layer_kernel_eigs" in names:
            out["layer_kernel_eigs"] = jnp.stack([_top(k, top_m) for k in Ks])
        if "kernel_drift" in names:
            out["kernel_drift"] = _rel_drift(K, ref.K)
        if "alignment" in names:
            y = ref.y.reshape(-1)
            Kf = flat_kernel(K)
            out["alignment"] = y @ Kf @ y / (jnp.linalg.norm(Kf) * (y @ y))
        if "coactivation_drift" in names:
            out["coactivation_drift"] = jnp.stack(
                [_rel_drift(coactivation(d), q0) for d, q0 in zip(view.Delta, ref.Q)]
            )
    return out


def closure_errors(view: View, ref_view: View) -> dict[str, Array]:
    """Error of one engine's fields against a reference engine's at the same time:
    `closure_error = ‖r − r_ref‖ / ‖r_ref‖` and, when both carry fields, per-layer
    `field_error = ‖H_l − H_l^ref‖_F / ‖H_l^ref‖_F`."""
    out = {"closure_error": _rel_drift(view.r, ref_view.r)}
    if view.H is not None and ref_view.H is not None:
        out["field_error"] = jnp.stack([_rel_drift(h, h0) for h, h0 in zip(view.H, ref_view.H)])
    return out


def validate(names, *, fields: bool, top_m: int) -> tuple[str, ...]:
    """Normalize `observables` (`None`: the engine's cheap defaults) and check it; `fields`
    says whether the engine carries fields (`FrozenKernel` carries only r)."""
    if names is None:
        names = DEFAULT_OBSERVABLES if fields else FIELD_FREE
    if isinstance(names, str):
        names = (names,)
    names = tuple(dict.fromkeys(("loss", *names)))
    unknown = [n for n in names if n not in OBSERVABLES]
    if unknown:
        raise ValueError(
            f"unknown observable(s) {unknown} in `observables`; choose from {sorted(OBSERVABLES)}."
        )
    if not fields:
        extra = [n for n in names if n not in FIELD_FREE]
        if extra:
            raise ValueError(
                f"this engine (FrozenKernel) carries only the residual r, so it cannot record "
                f"{extra}; record {FIELD_FREE}, or use gramflow.Collective() or Weights()."
            )
    if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m <= 0:
        raise ValueError(f"`top_m` must be a positive int, got {top_m!r}.")
    return names
