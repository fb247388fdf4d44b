"""What a trajectory records: observables, functions of the fields at one time.

An observable is an `AbstractObservable` (with an optional reference taken at t = 0, for
drifts) or any plain callable `fn(view) -> array` on a `View` of the fields; the built-in ones
also have names, the strings the command line uses. The sweep learns what each returns with
`jax.eval_shape` — nothing here needs to be registered anywhere.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._algebra import coactivation, flat_kernel
from ..fields.kernels import collective_kernel
from ..fields.operators import all_operators
from ..model.network import neuron_balance


class Spectators(eqx.Module):
    """Sites that ride along a run without entering the loss (a test set, I9): their inputs
    `X` `(Q, d)` (`None` for the frozen kernel), targets `y`, current outputs `f` `(Q,)` or
    `(Q, k)`, and forward fields `H` (a tuple per layer, `None` for the frozen kernel)."""

    X: Float[Array, "Q d"] | None
    y: Float[Array, "Q *k"]
    f: Float[Array, "Q *k"]
    H: tuple | None = None


class View(eqx.Module):
    """The fields an observable may read; `H`, `Z`, `D`, `Delta` are `None` for engines that
    carry only the residual. `layers` are the current `Layer`s (their local kernels; the
    first may hold no weight matrix, see the collective engine), `weights` the effective
    weights generating the Gram operators (`W̃_1` may be `None`), `op_masks` the masks
    generating them if not `D`, `net` the current network when the engine has it whole, and
    `test` the spectator sites (`Spectators`) when the run has a test set."""

    r: Float[Array, "P *k"]
    H: tuple | None = None
    Z: tuple | None = None
    D: tuple | None = None
    Delta: tuple | None = None
    layers: tuple | None = None
    weights: tuple | None = None
    op_masks: tuple | None = None
    net: eqx.Module | None = None
    test: Spectators | None = None


def _rel_drift(A, A0):
    return jnp.linalg.norm((A - A0).ravel()) / jnp.linalg.norm(A0.ravel())


def _kernels(view: View):
    """`(K_1..K_L, K)` of the view's layers (`Layer.kernel`)."""
    Ks = tuple(layer.kernel(z, d) for layer, z, d in zip(view.layers, view.Z, view.Delta))
    return Ks, sum(Ks[1:], Ks[0])


def _top(K, m):
    return jnp.linalg.eigvalsh(flat_kernel(K))[::-1][:m]


class AbstractObservable(eqx.Module):
    """A quantity recorded along a run: `obs(view, ref) -> array`, with `ref =
    obs.reference(view0, y)` computed once from the initial view and the targets (default
    `None`). `needs_fields = False` for what engines carrying only r can record."""

    name: ClassVar[str] = "observable"
    needs_fields: ClassVar[bool] = True
    #: whether it reads the spectator sites (`simulate(..., test=(X_test, y_test))`)
    needs_test: ClassVar[bool] = False
    #: names of the axes of one record (a prefix is used when the value has fewer axes)
    dims: ClassVar[tuple[str, ...]] = ()

    def reference(self, view: View, y) -> Any:
        return None

    @abc.abstractmethod
    def __call__(self, view: View, ref) -> Array:
        ...


class Loss(AbstractObservable):
    """`½ Σ r²`, `()` (always recorded)."""

    name: ClassVar[str] = "loss"
    needs_fields: ClassVar[bool] = False

    def __call__(self, view, ref):
        return 0.5 * jnp.sum(view.r**2)


class Residual(AbstractObservable):
    """The residual `r`, `(P,)` or `(P, k)`."""

    name: ClassVar[str] = "r"
    dims: ClassVar[tuple[str, ...]] = ("sample", "output")
    needs_fields: ClassVar[bool] = False

    def __call__(self, view, ref):
        return view.r


class KernelTrace(AbstractObservable):
    """`tr K_l` per layer, `(L,)`, O(P N) (`Layer.trace`)."""

    name: ClassVar[str] = "kernel_trace"
    dims: ClassVar[tuple[str, ...]] = ("layer",)

    def __call__(self, view, ref):
        return jnp.stack([layer.trace(z, d) for layer, z, d in zip(view.layers, view.Z, view.Delta)])


class KernelShare(AbstractObservable):
    """`tr K_l / tr K`, `(L,)`."""

    name: ClassVar[str] = "kernel_share"
    dims: ClassVar[tuple[str, ...]] = ("layer",)

    def __call__(self, view, ref):
        tr = KernelTrace()(view, ref)
        return tr / jnp.sum(tr)


class ActiveFraction(AbstractObservable):
    """Fraction of active units per layer, `(L,)`: the mean of `D_l` over the live units —
    those whose `H_l` column is not identically zero, which leaves out the zero-padded units
    of a width sweep (a real unit is never exactly zero on every sample unless it is dead
    for good)."""

    name: ClassVar[str] = "active_fraction"
    dims: ClassVar[tuple[str, ...]] = ("layer",)

    def __call__(self, view, ref):
        out = []
        for h, d in zip(view.H, view.D):
            live = jnp.any(h != 0, axis=0)
            out.append(jnp.sum(d) / (h.shape[0] * jnp.maximum(jnp.sum(live), 1)))
        return jnp.stack(out)


class KernelEigenvalues(AbstractObservable):
    """Top-`m` eigenvalues of K, descending, `(m,)`."""

    m: int = eqx.field(static=True, default=5)
    name: ClassVar[str] = "kernel_eigs"
    dims: ClassVar[tuple[str, ...]] = ("eigenvalue",)

    def __call__(self, view, ref):
        return _top(_kernels(view)[1], self.m)


class LayerKernelEigenvalues(AbstractObservable):
    """Top-`m` eigenvalues of each `K_l`, `(L, m)`."""

    m: int = eqx.field(static=True, default=5)
    name: ClassVar[str] = "layer_kernel_eigs"
    dims: ClassVar[tuple[str, ...]] = ("layer", "eigenvalue")

    def __call__(self, view, ref):
        return jnp.stack([_top(k, self.m) for k in _kernels(view)[0]])


class ConditionNumber(AbstractObservable):
    """`λ_max(K) / λ_min(K)`, `()`."""

    name: ClassVar[str] = "condition_number"

    def __call__(self, view, ref):
        ev = jnp.linalg.eigvalsh(flat_kernel(_kernels(view)[1]))
        return ev[-1] / ev[0]


class Kernel(AbstractObservable):
    """The full kernel K, `(P, P)` or `(P, P, k, k)` per record (memory!)."""

    name: ClassVar[str] = "kernel"
    dims: ClassVar[tuple[str, ...]] = ("sample", "sample_", "output", "output_")

    def __call__(self, view, ref):
        return _kernels(view)[1]


class KernelDrift(AbstractObservable):
    """`‖K(t) − K(0)‖_F / ‖K(0)‖_F`, `()`."""

    name: ClassVar[str] = "kernel_drift"

    def reference(self, view, y):
        return _kernels(view)[1]

    def __call__(self, view, ref):
        return _rel_drift(_kernels(view)[1], ref)


class Alignment(AbstractObservable):
    """Kernel–target alignment `⟨y, K y⟩ / (‖K‖_F ‖y‖²)`, `()`."""

    name: ClassVar[str] = "alignment"

    def reference(self, view, y):
        return y

    def __call__(self, view, ref):
        y = ref.reshape(-1)
        Kf = flat_kernel(_kernels(view)[1])
        return y @ Kf @ y / (jnp.linalg.norm(Kf) * (y @ y))


class CoactivationDrift(AbstractObservable):
    """`‖Q_l(t) − Q_l(0)‖_F / ‖Q_l(0)‖_F` per layer, `(L,)`."""

    name: ClassVar[str] = "coactivation_drift"
    dims: ClassVar[tuple[str, ...]] = ("layer",)

    def reference(self, view, y):
        return tuple(coactivation(d) for d in view.Delta)

    def __call__(self, view, ref):
        return jnp.stack([_rel_drift(coactivation(d), q0) for d, q0 in zip(view.Delta, ref)])


class BalanceDrift(AbstractObservable):
    """`max_i |b_i(t) − b_i(0)|` of the per-neuron balance laws of layers 1..L−1
    (`gramflow.diagnostics.balance`), `(L,)`: NaN where a skip path breaks them, and for
    layer L, whose outgoing weights are the fixed readout."""

    name: ClassVar[str] = "balance_drift"
    dims: ClassVar[tuple[str, ...]] = ("layer",)

    def reference(self, view, y):
        return neuron_balance(view.net)

    def __call__(self, view, ref):
        out = [jnp.nan if b is None else jnp.max(jnp.abs(b - b0))
               for b, b0 in zip(neuron_balance(view.net), ref)]
        out.append(jnp.nan)
        return jnp.stack([jnp.asarray(v, view.r.dtype) for v in out])


class OperatorDrift(AbstractObservable):
    """`‖𝔊(t) − 𝔊(0)‖_F / ‖𝔊(0)‖_F` per Gram operator, `(n_pairs,)`, in the order of
    `gramflow.operator_pairs(L)`; materializes them: small problems only."""

    name: ClassVar[str] = "operator_drift"
    dims: ClassVar[tuple[str, ...]] = ("operator_pair",)

    def _ops(self, view):
        D = view.D if view.op_masks is None else view.op_masks
        return all_operators(view.weights, D, view.r.shape[0], view.r.dtype)

    def reference(self, view, y):
        return self._ops(view)

    def __call__(self, view, ref):
        drifts = [_rel_drift(op, op0) for op, op0 in zip(self._ops(view), ref)]
        return jnp.stack(drifts) if drifts else jnp.zeros((0,), view.r.dtype)


class TestLoss(AbstractObservable):
    """Test loss `½ Σ (f(X_test) − y_test)²`, `()` (needs `test=`)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    name: ClassVar[str] = "test_loss"
    needs_fields: ClassVar[bool] = False
    needs_test: ClassVar[bool] = True

    def __call__(self, view, ref):
        return 0.5 * jnp.sum((view.test.f - view.test.y) ** 2)


class TestError(AbstractObservable):
    """Test error rate, `()`: the fraction of test points whose sign (scalar output) or
    argmax (vector output) differs from the target's (needs `test=`)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    name: ClassVar[str] = "test_error"
    needs_fields: ClassVar[bool] = False
    needs_test: ClassVar[bool] = True

    def __call__(self, view, ref):
        f, y = view.test.f, view.test.y
        if f.ndim == 1:
            wrong = jnp.sign(f) != jnp.sign(y)
        else:
            wrong = jnp.argmax(f, axis=-1) != jnp.argmax(y, axis=-1)
        return jnp.mean(wrong.astype(f.dtype))


class TestOutput(AbstractObservable):
    """The outputs at the test sites, `(Q,)` or `(Q, k)` (needs `test=`)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    name: ClassVar[str] = "test_output"
    dims: ClassVar[tuple[str, ...]] = ("test_sample", "output")
    needs_fields: ClassVar[bool] = False
    needs_test: ClassVar[bool] = True

    def __call__(self, view, ref):
        return view.test.f


class CrossKernel(AbstractObservable):
    """The cross kernel `K(X_test, X)`, `(Q, P)` or `(Q, P, k, k)` (I9; needs `test=`)."""

    name: ClassVar[str] = "cross_kernel"
    dims: ClassVar[tuple[str, ...]] = ("test_sample", "sample", "output", "output2")
    needs_test: ClassVar[bool] = True

    def __call__(self, view, ref):
        return collective_kernel(view.net, view.test.X, view.Z[0])


class TestAlignment(AbstractObservable):
    """Kernel–target alignment on the test set, `⟨y, K y⟩ / (‖K‖_F ‖y‖²)` with
    `K = K(X_test, X_test)`, `()` (needs `test=`; `alignment` is the training set's)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    name: ClassVar[str] = "test_alignment"
    needs_test: ClassVar[bool] = True

    def __call__(self, view, ref):
        y = view.test.y.reshape(-1)
        Kf = flat_kernel(collective_kernel(view.net, view.test.X))
        return y @ Kf @ y / (jnp.linalg.norm(Kf) * (y @ y))


class GradientNoise(AbstractObservable):
    """Noise of a mini-batch gradient against its mean, `(2,)`: `[tr Cov g_b, ‖E g_b‖²]`.

    `g_b = Σ_{μ∈b} g_μ` is the gradient of the batch loss `½ Σ_{μ∈b} r_μ²` of a batch of
    `batch_size` = B samples drawn without replacement from the P training sites, at the
    current fields. With `g_μ = r_μ ∂f_μ/∂θ`: `‖g_μ‖² = r_μᵀ K_μμ r_μ` and `‖Σ_μ g_μ‖² = rᵀ K r`
    (I2), so, for the per-sample covariance `tr Σ = (1/P) Σ_μ ‖g_μ‖² − ‖(1/P) Σ_μ g_μ‖²`,

        tr Cov g_b = B (P − B) / (P − 1) · tr Σ,        E g_b = (B / P) ∇L.

    O(P N) for the kernel's diagonal plus one matrix-free product `K r` (I6). Full batch
    (B = P) has no noise. This is the noise of one step's batch drawn uniformly without
    replacement (as `batch_schedule` draws each batch, marginally); batches of your own
    (`batches=`, duplicates) may have other statistics.
    """

    name: ClassVar[str] = "gradient_noise"
    dims: ClassVar[tuple[str, ...]] = ("statistic",)
    batch_size: int = eqx.field(static=True)

    def __check_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive int, got {self.batch_size!r}.")

    def __call__(self, view, ref):
        r, P, B = view.r, view.r.shape[0], self.batch_size
        if B > P:
            raise ValueError(f"`GradientNoise(batch_size={B})` describes batches of {B} of the "
                             f"P = {P} training sites; batch_size must be at most P.")
        diag = sum(jax.vmap(lambda z, d, layer=layer: layer.kernel(z[None], d[None])[0, 0])(z, d)
                   for layer, z, d in zip(view.layers, view.Z, view.Delta))  # (P,) / (P, k, k)
        per_sample = diag * r**2 if r.ndim == 1 else jnp.einsum("pi,pij,pj->p", r, diag, r)
        Kr = sum(layer.matmat(z, d, r[..., None])[..., 0]
                 for layer, z, d in zip(view.layers, view.Z, view.Delta))
        full = jnp.sum(r * Kr)  # ‖∇L‖²
        var = jnp.maximum(jnp.mean(per_sample) - full / P**2, 0.0)  # ≥ 0 up to rounding
        factor = B * (P - B) / (P - 1) if P > 1 else 0.0
        return jnp.stack([factor * var, (B / P) ** 2 * full])


class Function(AbstractObservable):
    """A plain callable `fn(view) -> array` as an observable (how user functions enter)."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, view, ref):
        return self.fn(view)


_BUILTIN = (Loss, Residual, KernelTrace, KernelShare, ActiveFraction, KernelEigenvalues,
            LayerKernelEigenvalues, KernelDrift, ConditionNumber, Alignment, CoactivationDrift,
            Kernel, BalanceDrift, OperatorDrift, TestLoss, TestError, TestOutput, CrossKernel,
            TestAlignment, GradientNoise)
_SHAPES = {"loss": "()", "r": "(P,) or (P, k)", "kernel_trace": "(L,)", "kernel_share": "(L,)",
           "active_fraction": "(L,)", "kernel_eigs": "(m,)", "layer_kernel_eigs": "(L, m)",
           "kernel_drift": "()", "condition_number": "()", "alignment": "()",
           "coactivation_drift": "(L,)", "kernel": "(P, P) or (P, P, k, k)",
           "balance_drift": "(L,)", "operator_drift": "(n_pairs,)", "test_loss": "()",
           "test_error": "()", "test_output": "(Q,) or (Q, k)",
           "cross_kernel": "(Q, P) or (Q, P, k, k)", "test_alignment": "()",
           "gradient_noise": "(2,)"}
#: name -> (shape per record, description) of the built-in observables (`L` hidden layers,
#: `m` = `top_m`); the names are what the command line and `observables=` strings accept.
OBSERVABLES = {cls.name: (_SHAPES[cls.name], cls.__doc__.split("\n")[0]) for cls in _BUILTIN}
DEFAULT_OBSERVABLES = ("loss", "r", "kernel_trace", "kernel_share", "active_fraction")
#: names gramflow records itself beside the observables
RESERVED = frozenset({"step", "first_nonfinite", "closure_error", "field_error"})
FIELD_FREE = ("loss", "r")  # what an engine that carries only r can record
TEST_DEFAULTS = ("test_loss", "test_error")  # added to the defaults when a run has a test set
BATCH_DEFAULTS = ("gradient_noise",)  # added to the defaults of a mini-batch run with fields


def _builtin(name: str, top_m: int, batch_size: int | None) -> AbstractObservable:
    cls = next(c for c in _BUILTIN if c.name == name)
    if cls is GradientNoise:
        if batch_size is None:
            raise ValueError("observable 'gradient_noise' describes mini-batch steps: give the "
                             "run a `batch_size` (or `batches`), or pass "
                             "gramflow.GradientNoise(batch_size=B) for a batch size of your own.")
        return cls(batch_size=batch_size)
    return cls(m=top_m) if cls in (KernelEigenvalues, LayerKernelEigenvalues) else cls()


def resolve(observables, *, fields: bool, top_m: int, test: bool = False,
            batch_size: int | None = None) -> dict[str, AbstractObservable]:
    """`observables` as an ordered dict name → `AbstractObservable`, `loss` first.

    Accepts `None` (the engine's cheap defaults), a sequence of built-in names, observable
    objects (named by their `name`) and callables `fn(view)` (named by `fn.__name__`), or a
    mapping name → any of those. `fields` says whether the engine carries fields
    (`FrozenKernel` carries only r); `test` whether the run has spectator sites;
    `batch_size` the size of its mini-batches (`None`: full batch).
    """
    if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m <= 0:
        raise ValueError(f"`top_m` must be a positive int, got {top_m!r}.")
    if observables is None:
        observables = (DEFAULT_OBSERVABLES if fields else FIELD_FREE) + (
            TEST_DEFAULTS if test else ()) + (
            BATCH_DEFAULTS if fields and batch_size is not None else ())
    if isinstance(observables, (str, AbstractObservable)) or callable(observables) \
            and not isinstance(observables, Mapping):
        observables = (observables,)
    items = observables.items() if isinstance(observables, Mapping) else [
        (None, o) for o in observables]
    out = {"loss": Loss()}
    for key, obs in items:
        if isinstance(obs, str):
            if obs not in OBSERVABLES:
                raise ValueError(f"unknown observable {obs!r} in `observables`; choose from "
                                 f"{sorted(OBSERVABLES)}, or pass an observable object or a "
                                 "function of the fields.")
            obs = _builtin(obs, top_m, batch_size)
        elif not isinstance(obs, AbstractObservable):
            if not callable(obs):
                raise TypeError(f"`observables` entries must be names, observables or "
                                f"callables fn(view), got {type(obs).__name__}.")
            obs = Function(obs)
        name = key if key is not None else (
            getattr(obs.fn, "__name__", "observable") if isinstance(obs, Function) else obs.name)
        if name == "loss" and isinstance(obs, Loss):
            continue  # always recorded
        if name in out or name in RESERVED or (name == "r" and not isinstance(obs, Residual)):
            where = "twice in `observables`" if name in out else "by gramflow"
            raise ValueError(
                f"observable name {name!r} is taken ({where}); give each observable its own "
                f"name, e.g. `observables={{'my_name': fn}}` (gramflow's own: loss, r, "
                f"{', '.join(sorted(RESERVED))}).")
        if obs.needs_test and not test:
            raise ValueError(
                f"observable {name!r} reads the test sites: pass `test=(X_test, y_test)` to "
                "the run (simulate, flow or sweep).")
        if not fields and obs.needs_fields:
            raise ValueError(
                f"this engine (FrozenKernel) carries only the residual r, so it cannot record "
                f"{name!r}; record {FIELD_FREE}, or use gramflow.Collective() or Weights()."
            )
        out[name] = obs
    return out


def references(view: View, y, observables: dict) -> dict:
    """Each observable's reference at t = 0."""
    return {name: obs.reference(view, y) for name, obs in observables.items()}


def observe(view: View, refs: dict, observables: dict) -> dict[str, Array]:
    """Evaluate every observable on one view (identical kernel products are shared by XLA)."""
    out = {}
    for name, obs in observables.items():
        value = obs(view, refs[name])
        try:
            value = jnp.asarray(value)
        except TypeError as err:
            raise TypeError(f"observable {name!r} returned {type(value).__name__}; an "
                            "observable must return a numeric array (or scalar).") from err
        if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
            raise TypeError(f"observable {name!r} returned dtype {value.dtype}; an observable "
                            "must return a numeric array (or scalar).")
        out[name] = value
    return out


#: axes of the records a `reference=` engine adds
CLOSURE_DIMS = {"closure_error": (), "field_error": ("layer",)}


def dims_of(name: str, observable: AbstractObservable | None, ndim: int) -> tuple[str, ...]:
    """The names of the `ndim` axes of one record of an observable (`axis<i>` where it does
    not name them)."""
    named = CLOSURE_DIMS.get(name, ()) if observable is None else observable.dims
    return tuple(named[i] if i < len(named) else f"axis{i}" for i in range(ndim))


def closure_errors(view: View, ref_view: View) -> dict[str, Array]:
    """Error of one engine's fields against a reference engine's at the same time:
    `closure_error = ‖r − r_ref‖ / ‖r_ref‖` and, when both carry fields, per-layer
    `field_error = ‖H_l − H_l^ref‖_F / ‖H_l^ref‖_F`."""
    out = {"closure_error": _rel_drift(view.r, ref_view.r)}
    if view.H is not None and ref_view.H is not None:
        out["field_error"] = jnp.stack([_rel_drift(h, h0) for h, h0 in zip(view.H, ref_view.H)])
    return out
