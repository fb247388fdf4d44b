"""Gradient descent (`simulate`) and gradient flow (`flow`) with any engine, and `Trajectory`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from ._checks import check_inputs
from ._engines import ENGINES, PairedEngine, build_engine
from ._network import ReLUNet, _positive_int
from ._observables import (
    closure_errors,
    observe,
    reference,
    validate,
)


class Trajectory(eqx.Module):
    """A recorded run of `simulate` (discrete steps) or `flow` (continuous time).

    **Fields** (T records):

    - `step`: `(T,)` ints for `simulate` — `step[i]` updates were applied before record i, so
      record 0 is the initial state; `None` for `flow`.
    - `t`: `(T,)` saved times for `flow`; `None` for `simulate`.
    - `loss`: `(T,)`, `½ Σ r²`.
    - `r`: `(T, P)` or `(T, P, k)` if `"r"` was recorded, else `None`.
    - `observables`: dict of the other recorded observables, each with leading axis T (see
      `gramflow.OBSERVABLES`); with a `reference` engine also `closure_error` `(T,)` and
      `field_error` `(T, L)`.
    - `final`: the engine's final state — a `ReLUNet` (weights engine), a `FieldState`
      (collective) or the residual (frozen kernel).
    - `first_nonfinite`: first step (`simulate`) or first saved-time index (`flow`) at which
      the loss is not finite; −1 if it stayed finite.
    - `engine`: the engine's name.
    """

    loss: Float[Array, " T"]
    r: Float[Array, "T P *k"] | None
    observables: dict[str, Array]
    final: PyTree
    first_nonfinite: Int[Array, ""]
    step: Int[Array, " T"] | None = None
    t: Float[Array, " T"] | None = None
    engine: str = eqx.field(static=True, default="weights")


def _check_lr(lr, dtype):
    if lr is None:
        raise ValueError("`lr` is required (the step size η of W ← W − η ∂L/∂W, L = ½ Σ r²).")
    lr = jnp.asarray(lr, dtype)
    if lr.ndim != 0:
        raise ValueError(f"`lr` must be a scalar, got shape {lr.shape}.")
    if not isinstance(lr, jax.core.Tracer) and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be positive and finite, got {float(lr)}.")
    return lr


def _check_engines(engine, reference_engine, optimizer, transport, operators="current"):
    """Validate the engine configuration; returns the closure `(transport, frozen)`."""
    for name, value in [("engine", engine), ("reference", reference_engine)]:
        if value is not None and value not in ENGINES:
            raise ValueError(f"unknown {name} {value!r}; expected one of {ENGINES}.")
    if optimizer is not None:
        if engine != "weights":
            raise ValueError(
                f"`optimizer` only applies to engine='weights' (got engine={engine!r}): the "
                "collective and frozen-kernel engines are exact rewritings of plain gradient "
                "descent, which an arbitrary optimizer is not."
            )
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer)}."
            )
    if transport is not None:
        if engine != "collective":
            raise ValueError("`transport` only applies to engine='collective'.")
        if isinstance(transport, bool) or not isinstance(transport, int) or transport < 0:
            raise ValueError(f"`transport` must be None or an int ≥ 0, got {transport!r}.")
    if operators not in ("current", "frozen"):
        raise ValueError(f"`operators` must be 'current' or 'frozen', got {operators!r}.")
    if operators == "frozen" and engine != "collective":
        raise ValueError("`operators='frozen'` only applies to engine='collective'.")
    return transport, operators == "frozen"


def _record(engine, state, names, scales, ref, top_m):
    out = observe(engine.view(state), scales, ref, names, top_m)
    if isinstance(engine, PairedEngine):
        out.update(closure_errors(engine.view(state), engine.ref_view(state)))
    return out


def _first_nonfinite(losses):
    """Index of the first non-finite loss, or −1."""
    bad = ~jnp.isfinite(losses)
    return jnp.where(jnp.any(bad), jnp.argmax(bad), -1)


def _check_operator_size(net, P, names):
    from ._operators import DEFAULT_MAX_BYTES, operator_bytes

    if "operator_drift" in names and 2 * operator_bytes(net, P) > DEFAULT_MAX_BYTES:
        raise ValueError(
            f"observable 'operator_drift' materializes the Gram operators, "
            f"{2 * operator_bytes(net, P):,} bytes with their t = 0 copies for P = {P} and "
            f"widths {net.widths}, above {DEFAULT_MAX_BYTES:,}; it is for small problems."
        )


def _make_engine(net, X, y, engine, reference_engine, optimizer, closure, lr, continuous):
    if engine == "weights" and optimizer is None and not continuous:
        optimizer = optax.sgd(lr)
    main = build_engine(
        engine, net, X, y, optimizer=optimizer, transport=closure[0], frozen=closure[1],
        continuous=continuous,
    )
    if reference_engine is None:
        return main
    ref_opt = optax.sgd(lr) if reference_engine == "weights" else None
    ref = build_engine(reference_engine, net, X, y, optimizer=ref_opt, continuous=continuous)
    return PairedEngine(main, ref)


@eqx.filter_jit
def _simulate(net, X, y, lr, optimizer, steps, record_every, engine, reference_engine,
              closure, names, top_m):
    eng = _make_engine(net, X, y, engine, reference_engine, optimizer, closure, lr, False)
    state = eng.init()
    ref = reference(eng.view(state), net.scales, y, names)
    record = lambda s: _record(eng, s, names, net.scales, ref, top_m)  # noqa: E731

    def advance(state, n):
        def one(state, _):
            return eng.step(state, lr)

        return jax.lax.scan(one, state, None, length=n)

    def chunk(state, _):
        state, losses = advance(state, record_every)
        return state, (record(state), losses)

    first = record(state)
    n_records, rest = divmod(steps, record_every)
    state, (records, losses) = jax.lax.scan(chunk, state, None, length=n_records)
    pieces = [jax.tree.map(lambda x: x[None], first), records]
    step_losses = [losses.reshape(-1)]
    marks = [np.arange(n_records + 1) * record_every]
    if rest:
        state, tail = advance(state, rest)
        pieces.append(jax.tree.map(lambda x: x[None], record(state)))
        step_losses.append(tail)
        marks.append(np.array([steps]))
    recs = jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)
    # Loss before each update (steps 0..steps-1), then the loss of the final state.
    all_losses = jnp.concatenate([*step_losses, recs["loss"][-1:]])
    return recs, eng.final(state), _first_nonfinite(all_losses), np.concatenate(marks)


def simulate(
    net: ReLUNet,
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    steps: int,
    lr: float | Array | None = None,
    engine: str = "weights",
    optimizer: optax.GradientTransformation | None = None,
    record_every: int = 1,
    observables: Sequence[str] | None = None,
    top_m: int = 5,
    reference: str | None = None,
    transport: int | None = None,
    operators: str = "current",
) -> Trajectory:
    """Gradient descent on `L = ½ Σ_μ r_μ²` (sum-reduced), `W ← W − η ∂L/∂W`, for `steps`
    steps; the whole loop is one `jax.lax.scan` under `jit`.

    Engines (DESIGN.md §3):

    - `"weights"`: the reference, on the weights; `optimizer` may be any
      `optax.GradientTransformation` (default `optax.sgd(lr)`).
    - `"collective"`: the fields `H_l`, `B_l`, `r` advanced by the exact discrete maps (I8);
      for one hidden layer the carried state is `H_1` and `r` alone (I3), with `C = X Xᵀ`
      applied as `X (Xᵀ ·)` when `d < P/2`. Equal to `"weights"` for any η.
      Closures (models, to measure what the hierarchy carries): `transport=n` keeps
      cross-layer transport of ≤ n layers in (I4), (I5) (`0`: layer-local only; `None`:
      all); `operators="frozen"` applies the Gram operators of t = 0 while the fields
      evolve. A closure advances by Euler steps of its flow, so even `transport=L−1`
      differs from the exact map by the O(η²) remainder (I7); pair it with
      `reference="weights"` to record its error.
    - `"frozen_kernel"`: `r_n = (I − ηK₀)^n r₀` through one eigendecomposition of `K₀`.

    **Arguments:**

    - `net`, `X` `(P, d)`, `y` `(P,)` or `(P, k)`: the problem.
    - `steps`: number of updates; `lr`: η (required unless an `optimizer` is given).
    - `record_every`: record every this many steps (and at the last step); record 0 is the
      initial state.
    - `observables`: names from `gramflow.OBSERVABLES` (default `None`: the O(P N) ones —
      loss, r, kernel traces and shares, active fractions; loss and r for the frozen kernel). `"kernel"` stores `(P, P)`
      matrices per record.
    - `top_m`: number of eigenvalues for `"kernel_eigs"` / `"layer_kernel_eigs"`.
    - `reference`: another engine run in the same scan; records `closure_error`
      (`‖r − r_ref‖ / ‖r_ref‖`) and per-layer `field_error`.

    **Returns:** a `Trajectory`. If the loss stops being finite, `first_nonfinite` says when
    and, when called eagerly, a `RuntimeWarning` suggests a smaller `lr`.
    """
    X, y = check_inputs(net, X, y)
    steps = _positive_int("steps", steps)
    record_every = _positive_int("record_every", record_every)
    closure = _check_engines(engine, reference, optimizer, transport, operators)
    names = validate(observables, engine=engine, top_m=top_m)
    _check_operator_size(net, X.shape[0], names)
    if lr is None and optimizer is not None and reference is None:
        lr = 1.0  # unused: the optimizer carries its own step size
    lr = _check_lr(lr, net.dtype)
    recs, final, bad, marks = _simulate(
        net, X, y, lr, optimizer, steps, record_every, engine, reference, closure, names, top_m
    )
    traj = _trajectory(recs, final, bad, engine, step=jnp.asarray(marks))
    _warn_if_diverged(traj, lr, "step")
    return traj


def _trajectory(recs, final, bad, engine, **time):
    recs = dict(recs)
    loss, r = recs.pop("loss"), recs.pop("r", None)
    return Trajectory(loss=loss, r=r, observables=recs, final=final, first_nonfinite=bad,
                      engine=engine, **time)


def _warn_if_diverged(traj, lr, what):
    bad = traj.first_nonfinite
    if isinstance(bad, jax.core.Tracer) or isinstance(lr, jax.core.Tracer) or int(bad) < 0:
        return
    warnings.warn(
        f"the loss became non-finite at {what} {int(bad)} (lr = {float(lr):g}); gradient "
        "descent diverged. Try a smaller lr: on L = ½ Σ r² it is stable near a minimum for "
        "lr < 2 / λ_max(K), with λ_max from `gramflow.collective_kernel`.",
        RuntimeWarning,
        stacklevel=3,
    )


@eqx.filter_jit
def _flow(net, X, y, lr, ts, t1, engine, reference_engine, closure, names, top_m, solver,
          rtol, atol, dtmin, max_steps):
    eng = _make_engine(net, X, y, engine, reference_engine, None, closure, lr, True)
    state = eng.init()
    ref = reference(eng.view(state), net.scales, y, names)
    record = lambda s: _record(eng, s, names, net.scales, ref, top_m)  # noqa: E731
    if engine == "frozen_kernel" and reference_engine is None:
        states = jax.vmap(lambda t: eng.at_time(t, lr))(ts)
        recs = jax.vmap(record)(states)
        return recs, eng.final(eng.at_time(t1, lr))
    # diffrax is handed the flat list of leaves: an empty tuple in the state (the
    # weight-free L = 1 collective engine carries no weights) trips its RK buffers.
    leaves, treedef = jax.tree.flatten(state)
    unflat = lambda ls: jax.tree.unflatten(treedef, ls)  # noqa: E731
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, ls, args: jax.tree.leaves(eng.rate(unflat(ls), lr))),
        diffrax.Tsit5() if solver is None else solver,
        t0=0.0,
        t1=t1,
        dt0=None,
        y0=leaves,
        saveat=diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=ts, fn=lambda t, ls, args: record(unflat(ls))),
                diffrax.SubSaveAt(t1=True),
            ]
        ),
        stepsize_controller=diffrax.PIDController(
            rtol=rtol, atol=atol, dtmin=None if dtmin is None else dtmin * t1, force_dtmin=True
        ),
        max_steps=max_steps,
    )
    recs, final = sol.ys
    return recs, eng.final(unflat([x[-1] for x in final]))


def flow(
    net: ReLUNet,
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    t1: float,
    ts: Float[Array, " T"] | None = None,
    lr: float | Array = 1.0,
    engine: str = "weights",
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    dtmin: float | None = None,
    max_steps: int = 100_000,
    observables: Sequence[str] | None = None,
    top_m: int = 5,
    reference: str | None = None,
    transport: int | None = None,
    operators: str = "current",
) -> Trajectory:
    """Gradient flow `dW/dt = −η ∂L/∂W` on `L = ½ Σ r²` from t = 0 to `t1`, through diffrax.

    Engines: `"weights"` integrates the weights; `"collective"` integrates the fields by
    (I2), (I4), (I5) with the Gram operators applied matrix-free from their generators (I6) —
    for one hidden layer `H_1` alone (I3); `"frozen_kernel"` is `r(t) = exp(−ηK₀t) r₀` in closed
    form. All agree with `"weights"` up to the solver tolerance (except the frozen kernel,
    which is the lazy limit). ReLU makes the vector field only piecewise smooth: adaptive
    step-size control handles the kinks where an activation changes.

    **Sliding.** A pre-activation can be pushed towards 0 from both sides and stay there
    (a Filippov sliding mode of the non-smooth flow). Then no step size resolves the flow and
    the solver exhausts `max_steps`; `flow` raises a `RuntimeError` saying so. With
    `dtmin=δ` steps below `δ·t1` are forced instead: the weights engine (and the one-hidden-
    layer collective engine, which is a linear image of it) then follows the sliding flow to
    O(δ), but the deeper collective hierarchy does not — its chain rule `dZ = D ⊙ dH` sees the
    chattering mask, not the pinned activation — so compare against `reference="weights"`.

    **Arguments:** `net`, `X`, `y` as in `simulate`; `t1`: final time; `ts`: saved times in
    `[0, t1]` (default 101 equispaced); `lr`: η; `solver`: any diffrax solver (default
    `Tsit5()`); `rtol`, `atol`: tolerances of the PID step-size controller; `dtmin`: smallest
    step as a fraction of `t1`, forced when reached (default `None`: never forced);
    `max_steps`: solver step budget; `observables`, `top_m`, `reference`, `transport`,
    `operators`: as in `simulate` (closures integrate B by (I5) and so also miss its jumps
    at activation flips — part of what their error measures).

    **Returns:** a `Trajectory` with `t = ts`; `first_nonfinite` is an index into `ts`.
    """
    X, y = check_inputs(net, X, y)
    closure = _check_engines(engine, reference, None, transport, operators)
    names = validate(observables, engine=engine, top_m=top_m)
    _check_operator_size(net, X.shape[0], names)
    lr = _check_lr(lr, net.dtype)
    t1 = jnp.asarray(t1, net.dtype)
    if not isinstance(t1, jax.core.Tracer) and not (np.isfinite(t1) and t1 > 0):
        raise ValueError(f"`t1` must be positive and finite, got {float(t1)}.")
    ts = jnp.linspace(0.0, t1, 101, dtype=net.dtype) if ts is None else jnp.asarray(ts, net.dtype)
    if ts.ndim != 1 or ts.shape[0] == 0:
        raise ValueError(f"`ts` must be a non-empty 1-D array of times, got shape {ts.shape}.")
    if not isinstance(ts, jax.core.Tracer) and not isinstance(t1, jax.core.Tracer):
        if np.any(np.diff(ts) < 0) or ts[0] < 0 or ts[-1] > t1:
            raise ValueError("`ts` must be non-decreasing times within [0, t1].")
    max_steps = _positive_int("max_steps", max_steps)
    try:
        recs, final = _flow(net, X, y, lr, ts, t1, engine, reference, closure, names, top_m,
                            solver, rtol, atol, dtmin, max_steps)
    except eqx.EquinoxRuntimeError as err:
        if "maximum number of solver steps" not in str(err):
            raise
        raise RuntimeError(
            f"flow: the solver used up max_steps = {max_steps} before t1. With ReLU this "
            "usually means sliding: a pre-activation pushed towards 0 from both sides stays "
            "pinned there, and the adaptive solver shrinks its step without end. Options: "
            "integrate to an earlier t1; use `simulate` with a small lr (the discrete maps "
            "are exact for any lr); or pass `dtmin=...` (a fraction of t1) so steps below it "
            "are forced — the weights engine then follows the sliding flow to O(dtmin), but "
            "the collective hierarchy (I4)/(I5) of depth ≥ 2 does not (see the flow docstring)."
        ) from err
    traj = _trajectory(recs, final, _first_nonfinite(recs["loss"]), engine, t=ts)
    _warn_if_diverged(traj, lr, "saved-time index")
    return traj
