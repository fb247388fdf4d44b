"""The pure core of a sweep: a batch of networks × learning rates × optimizers in one program,
and the exact width padding that lets networks of different widths share it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jaxtyping import Array, Float, Int

from ..model.network import ReLUNet
from .engines import AbstractEngine, Weights
from .simulate import Trajectory, simulate


def pad_network(net: ReLUNet, widths: Sequence[int]) -> ReLUNet:
    """Zero-pad the hidden layers of `net` to `widths`: padded units get zero incoming and
    outgoing weights and zero readout, so they stay exactly inactive (relu'(0) = 0: their
    `Δ` and `Z` stay zero, so do their gradients) and every trajectory is unchanged; the
    scales keep the true widths (they are array leaves). Masks are zero-padded too; gains and
    skip strengths are kept (a skip path needs the padded layer to stay square)."""
    if tuple(widths) == net.widths:
        return net
    weights, fan_in = [], net.in_dim
    for W, n in zip(net.weights, widths):  # (`jnp.pad`: a scatter would compile slower)
        weights.append(jnp.pad(W, ((0, n - W.shape[0]), (0, fan_in - W.shape[1]))))
        fan_in = n
    a = net.readout
    readout = jnp.pad(a, ((0, widths[-1] - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))
    masks = None if net.masks is None else tuple(
        None if m is None else m.padded(w.shape) for m, w in zip(net.masks, weights))
    return ReLUNet(weights, readout, net.scales, net.parametrization, masks=masks,
                   gains=net.gains, skips=net.skips, train=net.train)


def width_buckets(archs: Sequence[tuple[int, ...]], in_dim: int, max_padding: float = 1.0):
    """Group architectures of one depth so that, padded to the widths of its largest member,
    each group wastes at most `max_padding` of its work: `Σ padded cost ≤ (1 + max_padding)
    Σ true cost`, with cost `Σ_l N_l (N_{l-1} + 1)` per network (weights and units).

    Returns a list of `(indices into archs, padded widths)`; a group of one is not padded."""
    if not 0 <= max_padding:
        raise ValueError(f"`max_padding` must be ≥ 0, got {max_padding!r}.")

    def cost(arch):
        sizes = (in_dim, *arch)
        return sum(n * (m + 1) for n, m in zip(sizes[1:], sizes[:-1]))

    order = sorted(range(len(archs)), key=lambda i: (cost(archs[i]), archs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            trial = groups[-1] + [i]
            top = tuple(max(archs[j][l] for j in trial) for l in range(len(archs[i])))
            if len(trial) * cost(top) <= (1 + max_padding) * sum(cost(archs[j]) for j in trial):
                groups[-1] = trial
                continue
        groups.append([i])
    return [(g, tuple(max(archs[j][l] for j in g) for l in range(len(archs[g[0]]))))
            for g in groups]


def stack(trees: Sequence):
    """Stack pytrees of one structure (networks, engines) along a new leading axis; their
    non-array parts (architecture, masks, an optimizer's integer and boolean settings) must
    be equal."""
    trees = list(trees)
    if not trees:
        raise ValueError("nothing to stack: give at least one network or engine.")
    first = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if jax.tree.structure(t) != first:
            raise ValueError(
                f"entry {i} differs from entry 0 in its static part (architecture, structure, "
                "or a non-float setting such as an optimizer's schedule length or a closure's "
                "transport): only array values may differ between entries of one batch; run "
                "the others in a separate call.")
    if not jax.tree.leaves(eqx.filter(trees[0], eqx.is_array)):
        raise ValueError("these entries hold no array values, so there is nothing to batch "
                         "over: pass a single engine instead of a list.")
    return eqx.combine(
        jax.tree.map(lambda *xs: jnp.stack(xs), *[eqx.filter(t, eqx.is_array) for t in trees]),
        eqx.filter(trees[0], eqx.is_array, inverse=True),
    )


def core_sweep(
    nets: ReLUNet,
    X: Float[Array, "P d"],
    y: Float[Array, "P *k"],
    *,
    steps: int,
    lrs: Float[Array, " R"] | None = None,
    engine: AbstractEngine | Sequence[AbstractEngine] = Weights(),
    record_every: int = 1,
    observables=None,
    top_m: int = 5,
    reference: AbstractEngine | None = None,
    test: tuple | None = None,
    batches: Int[Array, "*N steps B"] | None = None,
) -> Trajectory:
    """`simulate` over a batch of networks × learning rates × engines, as one pure JAX
    function: `jax.jit`, `jax.vmap` and `jax.grad` (e.g. with respect to `lrs` or the
    networks) all work through it.

    **Arguments:**

    - `nets`: a `ReLUNet` whose array leaves carry a leading batch axis B (from
      `jax.vmap(lambda k: ReLUNet.init(k, ...))(keys)`, or `stack([...])` of networks of one
      structure; networks of different widths are first made equal by `pad_network`, which
      is exact).
    - `X`, `y`: the data, shared by every run.
    - `steps`, `record_every`, `observables`, `top_m`, `reference`, `test`: as in
      `simulate` (the test sites `(X_test, y_test)` ride along every run).
    - `lrs`: `(R,)` learning rates, or `None` (engines with their own optimizer).
    - `engine`: one engine, or a sequence of engines of one structure with different
      numbers, e.g. `[Weights(optax.adam(lr)) for lr in (1e-3, 1e-2)]` (axis E); they run
      side by side in one vmap.
    - `batches`: mini-batch SGD as `simulate(..., batches=)`: an int array `(steps, b)` of
      sample indices shared by every run, or `(B, steps, b)`, one schedule per network
      (e.g. `jnp.stack([batch_schedule(k, P, b, steps) for k in keys])`); `None`: full batch.

    **Returns:** a `Trajectory` whose arrays carry the leading axes `(B, R, E)` — `R` only
    when `lrs` is given, `E` only when a sequence of engines is.
    """
    batched_engines = not isinstance(engine, AbstractEngine)
    engines = stack(list(engine)) if batched_engines else engine
    net_arrays, net_static = eqx.partition(nets, eqx.is_array)
    eng_arrays, eng_static = eqx.partition(engines, eqx.is_array)
    per_net = _check_core_batches(batches, net_arrays)
    static = []  # the non-array half of the Trajectory, seen once while tracing

    def run(net_arrays, batches, lr, eng_arrays):
        traj = simulate(eqx.combine(net_arrays, net_static), X, y, steps=steps, lr=lr,
                        engine=eqx.combine(eng_arrays, eng_static), record_every=record_every,
                        observables=observables, top_m=top_m, reference=reference,
                        test=test, batches=batches)
        arrays, rest = eqx.partition(traj, eqx.is_array)
        static.append(rest)
        return arrays

    if batched_engines:
        run = jax.vmap(run, in_axes=(None, None, None, 0))
    if lrs is not None:
        run = jax.vmap(run, in_axes=(None, None, 0, None))
    run = jax.vmap(run, in_axes=(0, 0 if per_net else None, None, None))
    out = run(net_arrays, batches, None if lrs is None else jnp.asarray(lrs), eng_arrays)
    return eqx.combine(out, static[0])


def _check_core_batches(batches, net_arrays) -> bool:
    """Whether `core_sweep`'s `batches` hold one schedule per network (3-D) rather than one
    shared by all (2-D); `ValueError` naming the argument for any other shape."""
    if batches is None:
        return False
    ndim = jnp.ndim(batches)
    if ndim == 2:
        return False
    n = jax.tree.leaves(net_arrays)[0].shape[0]
    if ndim != 3 or jnp.shape(batches)[0] != n:
        raise ValueError(
            "`batches` must be an int array (steps, b) shared by every network, or "
            f"(B, steps, b) with one schedule per network (B = {n} networks here), got shape "
            f"{jnp.shape(batches)}.")
    return True


def run_pairs(nets: ReLUNet, lrs: Float[Array, " B"], X, y,
              batches: Int[Array, "B steps b"] | None = None, test: tuple | None = None, *,
              steps: int, engine, record_every: int, observables, top_m: int, reference,
              vmap_size: int | None = None) -> dict[str, Array]:
    """`simulate` on the pairs `(nets[b], lrs[b])` in one program: the unit of work of the
    `sweep` driver, which chunks, shards and stores it. Returns the recorded arrays (`loss`,
    `r` if recorded, each observable, `first_nonfinite`, `step`), leading axis B.

    `batches`: `None` (full-batch gradient descent) or `(B, steps, b)`, the mini-batches of
    each pair (`simulate(..., batches=batches[i])`). `test`: `(X_test, y_test)` spectator
    sites shared by every pair (`simulate(..., test=)`). Both are positional so that a
    memory estimate read off the program (`working_bytes`) counts them as inputs.

    `vmap_size`: `None` runs all B pairs side by side (one `jax.vmap`); an int k runs them
    k at a time side by side, the groups one after another (`jax.lax.map`; k = 1: plain
    runs in a loop, as `simulate` would run them — on CPU, where XLA's batched matrix
    products of wide layers are slower than a sequence of plain ones)."""
    net_arrays, net_static = eqx.partition(nets, eqx.is_array)

    def one(args):
        arrays, lr, bs = args
        traj = simulate(eqx.combine(arrays, net_static), X, y, steps=steps, lr=lr,
                        engine=engine, record_every=record_every, observables=observables,
                        top_m=top_m, reference=reference, test=test, batches=bs)
        return {"loss": traj.loss, **({"r": traj.r} if traj.r is not None else {}),
                **traj.observables, "first_nonfinite": traj.first_nonfinite,
                "step": traj.step}

    args = (net_arrays, lrs, batches)
    if vmap_size is None or vmap_size >= lrs.shape[0]:
        return jax.vmap(one)(args)
    return jax.lax.map(one, args, batch_size=None if vmap_size == 1 else vmap_size)


#: `run_pairs` compiled once per static configuration and shape and kept: a sweep called
#: twice with the same grid reuses its programs instead of tracing them again.
run_pairs_jit = eqx.filter_jit(run_pairs)


def working_bytes(fn, *args, **kwargs) -> int:
    """An estimate of the memory `fn(*args, **kwargs)` needs, read off its program (not off
    what its inputs mean): its arguments and outputs plus four times its largest intermediate
    array, found by walking the jaxpr and every sub-jaxpr (scan bodies, jitted calls)."""
    closed = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
    nbytes = lambda v: int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize  # noqa: E731
    largest = 0
    stack = [closed.jaxpr]
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                if isinstance(v.aval, jax.core.ShapedArray):
                    largest = max(largest, nbytes(v))
            stack.extend(jex_core.jaxprs_in_params(eqn.params))
    ends = sum(nbytes(v) for v in (*closed.jaxpr.invars, *closed.jaxpr.outvars)
               if isinstance(v.aval, jax.core.ShapedArray))
    return ends + 4 * largest


class _Prefix:
    """An array of shape `shape` held as the first `prod(shape)` entries of the 1-D `flat`:
    what a random draw and the elementwise operations on it give (`_eval_jaxpr`), computed
    on `flat`, so that draws of one key share them."""

    __slots__ = ("flat", "shape")

    def __init__(self, flat, shape):
        self.flat, self.shape = flat, tuple(shape)

    def value(self):
        return self.flat[: math.prod(self.shape)].reshape(self.shape)


#: primitives that act entry by entry (on arrays of one shape, or with a scalar)
_ELEMENTWISE = frozenset((
    "abs", "add", "and", "bitcast_convert_type", "cbrt", "ceil", "clamp",
    "convert_element_type", "copy", "cos", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "log1p", "logistic",
    "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision",
    "rem", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sqrt", "square", "sub", "tan", "tanh", "xor"))


def _memo_key(eqn, invals):
    """What identifies an equation's result: its primitive, parameters and inputs (traced
    values by identity, `_Prefix`es by their flat array, constants by value); None if its
    parameters cannot be hashed."""
    parts = []
    for x in invals:
        if isinstance(x, _Prefix):
            parts.append(("flat", id(x.flat)))
        elif isinstance(x, jax.core.Tracer):
            parts.append(id(x))
        else:
            try:
                a = np.asarray(x)
            except TypeError:  # (a constant key array)
                return None
            parts.append((a.dtype.str, a.shape, a.tobytes()))
    key = (eqn.primitive, tuple(sorted(eqn.params.items())), tuple(parts))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _eval_jaxpr(jaxpr, consts, args, random_bits, barrier=None, memo=None):
    """`jax.core.eval_jaxpr` with nested `jit` calls inlined and every `random_bits`
    equation answered by `random_bits(key, bit_width, shape)`, which may return a `_Prefix`:
    elementwise equations on it (with scalars) then act on its flat array, so that draws of
    one key share them, and the others on its value. `barrier(x)`: applied to the result of
    every equation of this jaxpr (not of nested ones), to round it as when it runs on its own
    (eagerly, each equation is a program: XLA must not merge the constant factors of
    successive products). `memo`: shared by the jaxprs of one trace, where an equation met
    twice on the same inputs (each initializer splitting the same key, transforming draws of
    one key alike) is evaluated once."""
    env = {}
    memo = {} if memo is None else memo

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        sub = eqn.params.get("jaxpr")
        if eqn.primitive.name in ("jit", "pjit") and isinstance(sub, jex_core.ClosedJaxpr):
            outs = _eval_jaxpr(sub.jaxpr, sub.consts, invals, random_bits, None, memo)
        else:
            prefixes = [x for x in invals if isinstance(x, _Prefix)]
            shape = prefixes[0].shape if prefixes else None
            lazy = prefixes and eqn.primitive.name in _ELEMENTWISE and all(
                p.shape == shape and p.flat.shape == prefixes[0].flat.shape for p in prefixes
            ) and all(isinstance(x, _Prefix) or np.size(x) == 1 for x in invals) and all(
                tuple(v.aval.shape) == shape for v in eqn.outvars)
            if not lazy:
                invals = [x.value() if isinstance(x, _Prefix) else x for x in invals]
            key = _memo_key(eqn, invals)
            if key is not None and key in memo:
                outs = memo[key][1]
            else:
                args_ = invals
                if lazy:  # on the flat arrays, scalars broadcast to them
                    n = prefixes[0].flat.shape
                    args_ = [x.flat if isinstance(x, _Prefix) else jnp.broadcast_to(
                        jnp.reshape(x, ()), n) for x in invals]
                if eqn.primitive.name == "random_bits":
                    outs = [random_bits(args_[0], eqn.params["bit_width"],
                                        eqn.params["shape"])]
                else:
                    with eqn.ctx.manager:
                        outs = eqn.primitive.bind(*args_,
                                                  **eqn.primitive.get_bind_params(eqn.params))
                    if not eqn.primitive.multiple_results:
                        outs = [outs]
                if key is not None:
                    memo[key] = invals, outs  # (the inputs kept alive: their ids stay theirs)
            if lazy:
                outs = [_Prefix(x, shape) for x in outs]
        if barrier is not None:
            outs = [barrier(x) for x in outs]
        env.update((v, x) for v, x in zip(eqn.outvars, outs)
                   if not isinstance(v, jex_core.DropVar))
    return [read(v) for v in jaxpr.outvars]


def _inexact(x) -> bool:
    return jnp.issubdtype((x.flat if isinstance(x, _Prefix) else x).dtype, jnp.inexact)


def flat_random_bits() -> bool:
    """Whether `random_bits(key, shape)` is the first `prod(shape)` entries of
    `random_bits(key, (n,))` for any larger n, reshaped: true of JAX's default PRNG
    (threefry2x32 with `jax_threefry_partitionable`, the default since JAX 0.5), which draws
    entry i from `threefry(key, i)` of its flat index i."""
    return bool(jax.config.jax_threefry_partitionable) and (
        jax.config.jax_default_prng_impl == "threefry2x32")


def vmap_keys(fns: Sequence[Callable], key_data) -> list:
    """`[jax.vmap(lambda k: fn(jax.random.wrap_key_data(k)))(key_data) for fn in fns]`, equal
    bit for bit to `fn` called eagerly on each key, but cheap to compile: every `fn` (e.g.
    `lambda key: ReLUNet.init(key, ...)`, returning arrays) is traced once to a jaxpr, and
    every random draw of every `fn` and key comes from one threefry program of one flat
    shape (see `flat_random_bits`), where a separate program per shape and per vmapped key
    would each cost XLA a fraction of a second to compile; draws of one key (the first
    layer of every width) share one flat draw and its transform (into normal values, ...).
    Works inside `jax.jit`; the draws' keys must not depend on other draws (true of
    initializers, which split their key). Without `flat_random_bits()` it is the plain
    `jax.vmap` (equal to the eager calls up to XLA's rounding of merged constant products).

    `key_data`: `(S, ...)`, `jax.random.key_data` of S keys."""
    wrap = jax.random.wrap_key_data
    if not flat_random_bits():
        return [jax.vmap(lambda k, fn=fn: fn(wrap(k)))(key_data) for fn in fns]
    one = wrap(key_data[0])
    traced = [jax.make_jaxpr(fn, return_shape=True)(one) for fn in fns]
    draws = []  # per draw, in the order the jaxprs make them: (its key's index, width, shape)
    widths = []  # per distinct key: the bit width of its draws

    def keys_of_draws(k):  # pass 1: every eqn but the draws (those feeding only draws die)
        found, index = [], {}

        def record(key, bit_width, shape):
            if (id(key), bit_width) not in index:  # draws of one key: prefixes of one draw
                index[id(key), bit_width] = len(found)
                found.append((key, jax.random.key_data(key)))
                widths.append(bit_width)
            draws.append((index[id(key), bit_width], bit_width, shape))
            return jnp.zeros(shape, f"uint{bit_width}")

        memo, key = {}, wrap(k)
        for closed, _ in traced:
            _eval_jaxpr(closed.jaxpr, closed.consts, [key], record, memo=memo)
        return [data for _, data in found]

    found = jax.lax.map(keys_of_draws, key_data)  # per distinct key, (S, ...) key data
    if not found:
        return [jax.vmap(lambda k, fn=fn: fn(wrap(k)))(key_data) for fn in fns]
    bits = [None] * len(found)
    for width in sorted(set(widths)):  # pass 2: one flat draw per key
        which = [u for u, w in enumerate(widths) if w == width]
        n = max(math.prod(shape) for u, w, shape in draws if w == width)
        keys = jnp.stack([found[u] for u in which], 1)  # (S, U, ...)
        flat = jax.lax.map(lambda k, n=n, width=width: jax.random.bits(
            wrap(k), (n,), f"uint{width}"), keys.reshape(-1, *keys.shape[2:]))
        for j, u in enumerate(which):
            bits[u] = flat.reshape(keys.shape[0], len(which), n)[:, j]

    # Pass 3, everything, each draw a prefix of its key's flat draw, in two parts. First, in
    # a loop over the keys, what eagerly ends a program (the transform of a draw into normal
    # values, a product, ...) on the flat arrays, the loop's outputs: XLA does not fuse
    # across a loop, so each is computed once, not once per array derived from it.
    rounded = []  # per rounding point (each equation's result, eagerly), its loop output

    def evaluate(k, bits, barrier):
        order, memo, key = iter(draws), {}, wrap(k)

        def give(key, bit_width, shape):
            return _Prefix(bits[next(order)[0]], shape)

        return [[x.value() if isinstance(x, _Prefix) else x for x in _eval_jaxpr(
            closed.jaxpr, closed.consts, [key], give, barrier, memo)] for closed, _ in traced]

    def flats(k, bits):
        out, index = [], {}

        def barrier(x):
            if not _inexact(x):
                return x
            if not isinstance(x, _Prefix):
                return jax.lax.optimization_barrier(x)
            if id(x.flat) not in index:
                index[id(x.flat)] = len(out)
                out.append(jax.lax.optimization_barrier(x.flat))
            rounded.append(index[id(x.flat)])
            return _Prefix(out[index[id(x.flat)]], x.shape)

        evaluate(k, bits, barrier)
        return out

    ends = jax.lax.map(lambda kb: flats(*kb), (key_data, bits))

    shared = len(set(rounded)) < len(rounded)  # else the loop is dead code, left to XLA

    def rest(k, bits, ends):  # then the rest, from the loop's outputs
        order = iter(rounded)

        def barrier(x):
            if not _inexact(x):
                return x
            if not isinstance(x, _Prefix):
                return jax.lax.optimization_barrier(x)
            if shared:
                return _Prefix(ends[next(order)], x.shape)
            return _Prefix(jax.lax.optimization_barrier(x.flat), x.shape)

        return [jax.tree.unflatten(jax.tree.structure(shape), leaves)
                for (_, shape), leaves in zip(traced, evaluate(k, bits, barrier))]

    return jax.vmap(rest)(key_data, bits, ends)

