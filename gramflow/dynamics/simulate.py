"""Gradient descent (`simulate`) and gradient flow (`flow`) with any engine, and `Trajectory`."""

from __future__ import annotations

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ..fields.operators import DEFAULT_MAX_BYTES, operator_bytes
from ..model.network import ReLUNet, _positive_int, check_inputs
from .engines import AbstractEngine, FrozenKernelRun, Paired, Weights
from .minibatch import batch_schedule, check_batches
from .observables import OperatorDrift, closure_errors, observe, references, resolve


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
    - `final`: the network at the end of the run, a `ReLUNet` (for the collective engine
      rebuilt from its generators, `W_1(t) = W_1(0) + M_1 ⊙ (A_t X)`); the residual for
      `FrozenKernel`, which has no network.
    - `state`: the engine's carried state at the end (`WeightsState` with the optax state,
      `FieldState`, ...): pass it back as `simulate(..., state=traj.state)` to continue
      the run exactly where it stopped.
    - `first_nonfinite`: first step (`simulate`) or first saved-time index (`flow`) at which
      the loss is not finite; −1 if it stayed finite.
    - `engine`: the engine object that produced it.
    """

    loss: Float[Array, " T"]
    r: Float[Array, "T P *k"] | None
    observables: dict[str, Array]
    final: PyTree
    first_nonfinite: Int[Array, ""]
    step: Int[Array, " T"] | None = None
    t: Float[Array, " T"] | None = None
    engine: AbstractEngine | None = None
    state: PyTree = None


def _check_lr(lr, dtype):
    if lr is None:
        raise ValueError("`lr` is required (the step size η of θ ← θ − η ∂L/∂θ, L = ½ Σ r²).")
    lr = jnp.asarray(lr, dtype)
    if lr.ndim != 0:
        raise ValueError(f"`lr` must be a scalar, got shape {lr.shape}.")
    if not isinstance(lr, jax.core.Tracer) and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be positive and finite, got {float(lr)}.")
    return lr


def _check_engine(name, engine, *, optional=False):
    if engine is None and optional:
        return None
    if isinstance(engine, str):
        raise TypeError(
            f"`{name}` takes an engine object, not the string {engine!r}: use "
            "gramflow.Weights(), gramflow.Collective() (closures: "
            "gramflow.Collective(closure=gramflow.TruncatedTransport(n)) or "
            "gramflow.FrozenOperators()) or gramflow.FrozenKernel()."
        )
    if isinstance(engine, type) and issubclass(engine, AbstractEngine):
        raise TypeError(f"`{name}` takes an engine object: write {engine.__name__}(), not "
                        f"{engine.__name__}.")
    if not isinstance(engine, AbstractEngine):
        raise TypeError(f"`{name}` must be a gramflow engine (Weights, Collective, "
                        f"FrozenKernel), got {type(engine).__name__}.")
    return engine


def _resolve_lr(engine, reference_engine, lr, dtype):
    """`lr` is the step of plain gradient descent: required unless the engine is `Weights`
    with its own optimizer, and an error beside one."""
    if reference_engine is not None and not reference_engine.needs_lr() and engine.needs_lr():
        raise ValueError(
            "the `reference` has its own optimizer while the engine runs plain gradient descent "
            "with `lr`: the closure error would compare two different algorithms. Use "
            "reference=gf.Weights() (plain gradient descent with the same lr).")
    if not engine.needs_lr():
        if lr is not None:
            raise ValueError(
                "`lr` and an optimizer were both given: the optimizer carries its own step "
                "size. Drop `lr`, or drop the optimizer for plain gradient descent with step lr."
            )
        if reference_engine is not None and reference_engine.needs_lr():
            raise ValueError("a `reference` engine of plain gradient descent needs `lr`, "
                             "which is ambiguous beside an optimizer; give the reference its "
                             "own optimizer: reference=gf.Weights(optimizer=...).")
        return jnp.asarray(1.0, dtype)  # unused
    return _check_lr(lr, dtype)


def _record(run, state, obs, refs):
    out = observe(run.view(state), refs, obs)
    if isinstance(run, Paired):
        out.update(closure_errors(run.view(state), run.ref_view(state)))
    return out


def _first_nonfinite(losses):
    """Index of the first non-finite loss, or −1."""
    bad = ~jnp.isfinite(losses)
    return jnp.where(jnp.any(bad), jnp.argmax(bad), -1)


def _check_operator_size(net, P, obs):

    needs = any(isinstance(o, OperatorDrift) for o in obs.values())
    if needs and 2 * operator_bytes(net, P) > DEFAULT_MAX_BYTES:
        raise ValueError(
            f"observable 'operator_drift' materializes the Gram operators, "
            f"{2 * operator_bytes(net, P):,} bytes with their t = 0 copies for P = {P} and "
            f"widths {net.widths}, above {DEFAULT_MAX_BYTES:,}; it is for small problems."
        )


def _check_state(state, expected):
    """`state` must have the layout of the engine's own (a `Trajectory.state` of the same
    engine, network and data), or the scan would fail with an unreadable error."""
    def layout(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]

    if layout(state) != layout(expected):
        raise ValueError(
            "`state` does not fit this run: pass the `state` of a Trajectory of the same "
            "engine, network (widths, structure, dtype) and data, e.g. "
            "`simulate(net, X, y, ..., state=previous.state)` with the same net, X, y and engine."
        )
    return state


def _build(net, X, y, engine, reference_engine, lr, continuous, test=None):
    # `test` only when given: engines written before test sites existed keep working.
    extra = {} if test is None else {"test": test}
    run = engine.build(net, X, y, lr, continuous=continuous, **extra)
    if reference_engine is None:
        return run
    return Paired(run, reference_engine.build(net, X, y, lr, continuous=continuous))


def check_test_pair(test, check):
    """`test=(X_test, y_test)` (or `None`) validated by `check(X_test, y_test)`, its errors
    prefixed with where they come from."""
    if test is None:
        return None
    if not isinstance(test, (tuple, list)) or len(test) != 2:
        raise TypeError("`test` must be a pair (X_test, y_test) of arrays of shapes (Q, d) and "
                        f"(Q,) or (Q, k), got {type(test).__name__}.")
    try:
        return check(*test)
    except (ValueError, TypeError) as err:
        raise type(err)(f"in `test=(X_test, y_test)`: {err}") from err


def check_test(net, test):
    """`test=(X_test, y_test)` validated against `net` like `X`, `y` (or `None`)."""
    return check_test_pair(test, lambda Xt, yt: tuple(check_inputs(net, Xt, yt)))


@eqx.filter_jit
def _simulate(net, X, y, lr, steps, record_every, engine, reference_engine, obs,
              state, test=None, batches=None):
    run = _build(net, X, y, engine, reference_engine, lr, False, test)
    state0 = run.init()
    refs = references(run.view(state0), y, obs)  # drifts: against t = 0 of net
    state = state0 if state is None else _check_state(state, state0)
    record = lambda s: _record(run, s, obs, refs)  # noqa: E731

    def advance(state, n, bs):
        if bs is None:
            return jax.lax.scan(lambda s, _: run.step(s, lr), state, None, length=n)
        return jax.lax.scan(lambda s, b: run.step(s, lr, b), state, bs)

    def chunk(state, bs):
        state, losses = advance(state, record_every, bs)
        return state, (record(state), losses)

    first = record(state)
    n_records, rest = divmod(steps, record_every)
    per_chunk = tail_batches = None
    if batches is not None:
        cut = n_records * record_every
        per_chunk = batches[:cut].reshape(n_records, record_every, batches.shape[1])
        tail_batches = batches[cut:]
    state, (records, losses) = jax.lax.scan(chunk, state, per_chunk, length=n_records)
    pieces = [jax.tree.map(lambda x: x[None], first), records]
    step_losses = [losses.reshape(-1)]
    marks = [np.arange(n_records + 1) * record_every]
    if rest:
        state, tail = advance(state, rest, tail_batches)
        pieces.append(jax.tree.map(lambda x: x[None], record(state)))
        step_losses.append(tail)
        marks.append(np.array([steps]))
    recs = jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)
    # Loss before each update (steps 0..steps-1), then the loss of the final state.
    all_losses = jnp.concatenate([*step_losses, recs["loss"][-1:]])
    return recs, run.final(state), state, _first_nonfinite(all_losses), np.concatenate(marks)


def simulate(
    net: ReLUNet,
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    steps: int | None = None,
    lr: float | Array | None = None,
    engine: AbstractEngine = Weights(),
    record_every: int = 1,
    observables=None,
    top_m: int = 5,
    reference: AbstractEngine | None = None,
    state: PyTree = None,
    test: tuple | None = None,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
    batches: Int[Array, "steps B"] | None = None,
) -> Trajectory:
    """Gradient descent on `L = ½ Σ_μ r_μ²` (sum-reduced), `θ ← θ − η ∂L/∂θ` over the trained
    parameters, for `steps` steps; the whole loop is one `jax.lax.scan` under `jit`.

    Engines (objects, see their docstrings):

    - `Weights(optimizer=None)`: the reference, on the parameters; any optax transformation
      (default `optax.sgd(lr)`), its state carried and returned.
    - `Collective()`: the fields `H_l`, `B_l`, `r` advanced by the exact discrete maps (I8);
      for one dense hidden layer the carried state is `H_1` and `r` alone (I3). Equal to
      `Weights()` for any η. `Collective(closure=TruncatedTransport(n))` /
      `Collective(closure=FrozenOperators())` are models that keep part of the hierarchy; pair
      them with `reference=Weights()` to record their error.
    - `FrozenKernel()`: `r_n = (I − ηK₀)^n r₀` through one eigendecomposition of `K₀`.

    **Arguments:**

    - `net`, `X` `(P, d)`, `y` `(P,)` or `(P, k)`: the problem.
    - `steps`: number of updates; `lr`: η (required, except beside an optimizer, where it is
      an error).
    - `engine`: an engine object (default `Weights()`).
    - `record_every`: record every this many steps (and at the last step); record 0 is the
      state the run starts from.
    - `observables`: what to record — observable objects (`gramflow.KernelDrift()`, ...),
      plain functions `fn(view) -> array` of the fields (`view.r`, `view.H`, `view.Z`,
      `view.D`, `view.Delta`, `view.layers`, ...), names of the built-in ones
      (`gramflow.OBSERVABLES`), or a dict name → any of those. Default `None`: the O(P N)
      ones — loss, r, kernel traces and shares, active fractions (loss and r for the frozen
      kernel). `"kernel"` stores `(P, P)` matrices per record.
    - `top_m`: number of eigenvalues for `"kernel_eigs"` / `"layer_kernel_eigs"`.
    - `reference`: another engine run in the same scan; records `closure_error`
      (`‖r − r_ref‖ / ‖r_ref‖`) and per-layer `field_error`.
    - `state`: the `state` of an earlier `simulate` `Trajectory` of the same engine and data,
      started from this same `net` (pass the network the first run started from, not its
      `final`: the collective engine rebuilds `W_1` from `net` and its field memory), to
      continue that run bit for bit as if it had not stopped; drift observables stay
      relative to `net`, and `step` counts from the resume. A `flow` state does not resume
      `simulate`.
    - `test`: `None`, or `(X_test, y_test)`: spectator sites that ride along without entering
      the loss (I9) — under the collective engine moved by cross Grams with the training
      sites (for one hidden layer without any weight matrix), under the frozen kernel by
      `K₀(X_test, X)`. Adds `test_loss` and `test_error` to the default observables; also
      available: `test_output`, `cross_kernel`, `test_alignment`.
    - `batch_size`, `key`: mini-batch SGD (I10): step n takes the loss `½ Σ_{μ∈b_n} r_μ²` of
      its batch `b_n` of `batch_size` samples, drawn from `key` without replacement within an
      epoch (`gramflow.batch_schedule(key, P, batch_size, steps)`). Every engine takes it:
      the weights engine runs forward and backward on the batch rows; the collective engine
      replaces `E_l` by `m ⊙ E_l` in the exact maps (I8), so it stays exact and the other
      sites move as spectators; the frozen kernel steps `r ← r − η K₀ (m ⊙ r)`. Records are
      on the full training set (`loss` is the full-batch loss; the loss of each step's batch
      decides `first_nonfinite`), and `gradient_noise` joins the defaults.
    - `batches`: instead of `batch_size` and `key`, the batches themselves, an int array
      `(steps, B)` of sample indices (an index listed twice within a batch counts twice);
      `steps` may then be left out. To continue a mini-batch run with `state=`, pass the
      rest of its schedule here.

    **Returns:** a `Trajectory`. If the loss stops being finite, `first_nonfinite` says when
    and, when called eagerly, a `RuntimeWarning` suggests a smaller `lr`.
    """
    X, y = check_inputs(net, X, y)
    batches = _check_sgd(X.shape[0], steps, batch_size, key, batches)
    steps = _positive_int("steps", batches.shape[0] if steps is None and batches is not None
                          else steps)
    record_every = _positive_int("record_every", record_every)
    engine = _check_engine("engine", engine)
    reference_engine = _check_engine("reference", reference, optional=True)
    test = check_test(net, test)
    obs = resolve(observables, fields=engine.carries_fields, top_m=top_m,
                  test=test is not None,
                  batch_size=None if batches is None else batches.shape[1])
    _check_operator_size(net, X.shape[0], obs)
    lr = _resolve_lr(engine, reference_engine, lr, net.dtype)
    if state is not None and reference_engine is not None:
        raise ValueError("`state` resumes a single run; it cannot be combined with `reference`.")
    if state is not None and key is not None:
        raise ValueError(
            "`state` with `batch_size` and `key` would draw the first batches of the schedule "
            "again. To continue a mini-batch run, pass the rest of its schedule: "
            "`s = gf.batch_schedule(key, P, B, total_steps)`, then `batches=s[:n]` for the "
            "first run and `batches=s[n:], state=first.state` for the next.")
    recs, final, end, bad, marks = _simulate(
        net, X, y, lr, steps, record_every, engine, reference_engine, obs, state, test, batches
    )
    traj = _trajectory(recs, final, bad, engine, step=jnp.asarray(marks),
                       state=end[0] if reference_engine is not None else end)
    _warn_if_diverged(traj, lr, "step")
    return traj


def _check_sgd(P, steps, batch_size, key, batches):
    """The `(steps, B)` batches of a mini-batch run, or `None` for full-batch GD."""
    if batches is not None:
        if batch_size is not None or key is not None:
            raise ValueError("give either `batches` (the batches themselves) or `batch_size` "
                             "and `key` (to draw them), not both.")
        return check_batches(batches, P, steps)
    if batch_size is None:
        if key is not None:
            raise ValueError("`key` draws mini-batches: give `batch_size` too (or drop `key` "
                             "for full-batch gradient descent).")
        if steps is None:
            raise ValueError("`steps` is required (the number of updates).")
        return None
    if key is None:
        raise ValueError("`batch_size` needs a `key` to draw the batches from, e.g. "
                         "key=jax.random.key(0); or pass `batches` yourself.")
    if steps is None:
        raise ValueError("`steps` is required (the number of updates).")
    return batch_schedule(key, P, batch_size, _positive_int("steps", steps))


def _trajectory(recs, final, bad, engine, **extra):
    recs = dict(recs)
    loss, r = recs.pop("loss"), recs.pop("r", None)
    return Trajectory(loss=loss, r=r, observables=recs, final=final, first_nonfinite=bad,
                      engine=engine, **extra)


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


def default_controller(dtype) -> diffrax.PIDController:
    """The step-size controller `flow` uses unless given one: `rtol = 1e-7, atol = 1e-9` in
    float64, `rtol = 1e-4, atol = 1e-6` in lower precision (tighter tolerances than the
    arithmetic only make the solver take more steps)."""
    if jnp.dtype(dtype) == jnp.float64:
        return diffrax.PIDController(rtol=1e-7, atol=1e-9)
    return diffrax.PIDController(rtol=1e-4, atol=1e-6)


@eqx.filter_jit
def _flow(net, X, y, lr, ts, t1, engine, reference_engine, obs, solver, controller,
          max_steps, test=None):
    run = _build(net, X, y, engine, reference_engine, lr, True, test)
    state = run.init()
    refs = references(run.view(state), y, obs)
    record = lambda s: _record(run, s, obs, refs)  # noqa: E731
    if isinstance(run, FrozenKernelRun):  # a closed form
        states = jax.vmap(lambda t: run.at_time(t, lr))(ts)
        recs = jax.vmap(record)(states)
        end = run.at_time(t1, lr)
        return recs, run.final(end), end
    # diffrax is handed the flat list of leaves: an empty tuple in the state (the
    # weight-free L = 1 collective engine carries no weights) trips its RK buffers.
    leaves, treedef = jax.tree.flatten(state)
    unflat = lambda ls: jax.tree.unflatten(treedef, ls)  # noqa: E731
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, ls, args: jax.tree.leaves(run.rate(unflat(ls), lr))),
        solver,
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
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    recs, final = sol.ys
    end = unflat([x[-1] for x in final])
    return recs, run.final(end), end


def flow(
    net: ReLUNet,
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    t1: float,
    ts: Float[Array, " T"] | None = None,
    lr: float | Array = 1.0,
    engine: AbstractEngine = Weights(),
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    max_steps: int = 100_000,
    observables=None,
    top_m: int = 5,
    reference: AbstractEngine | None = None,
    test: tuple | None = None,
) -> Trajectory:
    """Gradient flow `dθ/dt = −η ∂L/∂θ` on `L = ½ Σ r²` from t = 0 to `t1`, through diffrax.

    Engines: `Weights()` integrates the parameters; `Collective()` integrates the fields by
    (I2), (I4), (I5) with the Gram operators applied matrix-free from their generators (I6) —
    for one dense hidden layer `H_1` alone (I3); `FrozenKernel()` is `r(t) = exp(−ηK₀t) r₀`
    in closed form. All agree with `Weights()` up to the solver tolerance (except the frozen
    kernel, which is the lazy limit). ReLU makes the vector field only piecewise smooth:
    adaptive step-size control handles the kinks where an activation changes.

    **Sliding.** A pre-activation can be pushed towards 0 from both sides and stay there
    (a Filippov sliding mode of the non-smooth flow). Then no step size resolves the flow and
    the solver exhausts `max_steps`; `flow` raises a `RuntimeError` saying so. With a
    controller that forces a smallest step (`diffrax.PIDController(..., dtmin=δ,
    force_dtmin=True)`) the weights engine (and the one-hidden-layer collective engine, a
    linear image of it) then follows the sliding flow to O(δ), but the deeper collective
    hierarchy does not — its chain rule `dZ = D ⊙ dH` sees the chattering mask, not the pinned
    activation — so compare against `reference=Weights()`.

    **Arguments:** `net`, `X`, `y` as in `simulate`; `t1`: final time; `ts`: saved times in
    `[0, t1]` (default 101 equispaced); `lr`: η; `engine`, `reference`: engine objects;
    `solver`: any diffrax solver (default `diffrax.Tsit5()`); `stepsize_controller`: any
    diffrax controller (default: `default_controller(dtype)`, tolerances set by the dtype);
    `max_steps`: solver step budget; `observables`, `top_m`: as in `simulate` (closures
    integrate B by (I5) and so also miss its jumps at activation flips — part of what their
    error measures); `test`: spectator sites `(X_test, y_test)` as in `simulate`.

    **Returns:** a `Trajectory` with `t = ts`; `first_nonfinite` is an index into `ts`.
    """
    X, y = check_inputs(net, X, y)
    engine = _check_engine("engine", engine)
    reference_engine = _check_engine("reference", reference, optional=True)
    if not engine.needs_lr():
        raise ValueError("`flow` integrates gradient flow; an optimizer has no flow. Use "
                         "gf.Weights() without an optimizer, or `simulate`.")
    test = check_test(net, test)
    obs = resolve(observables, fields=engine.carries_fields, top_m=top_m,
                  test=test is not None)
    _check_operator_size(net, X.shape[0], obs)
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
    solver = diffrax.Tsit5() if solver is None else solver
    controller = default_controller(net.dtype) if stepsize_controller is None else stepsize_controller
    try:
        recs, final, end = _flow(net, X, y, lr, ts, t1, engine, reference_engine, obs,
                                 solver, controller, max_steps, test)
    except eqx.EquinoxRuntimeError as err:
        if "maximum number of solver steps" not in str(err):
            raise
        raise RuntimeError(
            f"flow: the solver used up max_steps = {max_steps} before t1. With ReLU this "
            "usually means sliding: a pre-activation pushed towards 0 from both sides stays "
            "pinned there, and the adaptive solver shrinks its step without end. Options: "
            "integrate to an earlier t1; use `simulate` with a small lr (the discrete maps "
            "are exact for any lr); or pass a controller that forces a smallest step, "
            "`stepsize_controller=diffrax.PIDController(rtol=..., atol=..., dtmin=δ, "
            "force_dtmin=True)` — the weights engine then follows the sliding flow to O(δ), "
            "but the collective hierarchy (I4)/(I5) of depth ≥ 2 does not (see the flow "
            "docstring)."
        ) from err
    traj = _trajectory(recs, final, _first_nonfinite(recs["loss"]), engine, t=ts,
                       state=end[0] if reference_engine is not None else end)
    _warn_if_diverged(traj, lr, "saved-time index")
    return traj
