"""Mini-batches (I10): which samples each SGD step sees, and the weights `m` they put on the
residual."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

from ..model.network import _positive_int


def batch_weights(batch: Int[Array, " B"], P: int, dtype) -> Array:
    """`m` `(P,)`: how many times each sample is in `batch`, the weights of the batch loss
    `½ Σ_μ m_μ r_μ²` (I10: one SGD step is (I8) with `E_l → m ⊙ E_l`)."""
    return jnp.zeros((P,), dtype).at[batch].add(1)


def weigh(m: Array, r: Array) -> Array:
    """`m ⊙ r` for a residual `(P,)` or `(P, k)`."""
    return m.reshape(m.shape + (1,) * (r.ndim - 1)) * r


#: the constant folded into a seed's key for its mini-batches: `batch_key(seed)`
BATCH_KEY = 0xBA7C4


def batch_key(seed: int) -> PRNGKeyArray:
    """The key the mini-batches of seed `seed` are drawn from by `sweep(batch_sizes=...)` and
    `gramflow simulate|sweep --batch-size`: `jax.random.fold_in(jax.random.key(seed),
    0xBA7C4)`, independent of the network's `jax.random.key(seed)`. A configuration of
    seed s and batch size B is `simulate(net, X, y, ..., batch_size=B, key=batch_key(s))`."""
    return jax.random.fold_in(jax.random.key(int(seed)), BATCH_KEY)


def batch_schedule(key: PRNGKeyArray, num_samples: int, batch_size: int,
                   steps: int) -> Int[Array, "steps B"]:
    """The batches of `steps` SGD steps, `(steps, batch_size)` sample indices: each epoch is a
    fresh permutation of the `num_samples` samples (epoch e drawn from
    `jax.random.fold_in(key, e)`), cut into `num_samples // batch_size` batches — no sample
    twice within an epoch; the last `num_samples mod batch_size` of each permutation are left
    out of that epoch (the next permutation is independent). `simulate(..., batch_size=B, key=key)` uses exactly
    `batch_schedule(key, P, B, steps)`, so a long run can be cut into pieces with
    `batches=schedule[a:b]` and `state=` and stay bit for bit the same."""
    P = _positive_int("num_samples", num_samples)
    B = _positive_int("batch_size", batch_size)
    steps = _positive_int("steps", steps)
    if B > P:
        raise ValueError(f"`batch_size` = {B} exceeds the number of samples, {P}.")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("`key` must be a typed PRNG key, `jax.random.key(seed)` (or "
                        f"`jax.random.wrap_key_data`), got {type(key).__name__}.")
    if key.shape != ():
        raise ValueError(f"`key` must be one PRNG key (shape ()), got shape {key.shape}; "
                         "for several runs, `jax.vmap` over the keys.")
    return _schedule(key, P, B, steps)


@eqx.filter_jit
def _schedule(key, P: int, B: int, steps: int):
    per_epoch = P // B
    epochs = -(-steps // per_epoch)
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(epochs))
    perms = jax.vmap(lambda k: jax.random.permutation(k, P))(keys)  # (epochs, P)
    batches = perms[:, : per_epoch * B].reshape(epochs * per_epoch, B)
    return batches[:steps].astype(jnp.int32)


def check_batches(batches, P: int, steps: int | None) -> Array:
    """A user's `(steps, B)` index array, validated (ints in `[0, P)`; under `jit`, at run
    time)."""
    try:
        arr = jnp.asarray(batches)
    except (TypeError, ValueError) as err:
        raise ValueError("`batches` must be an int array (steps, B) of sample indices, one "
                         f"row per step, all rows of the same length: {err}") from err
    if arr.ndim != 2 or 0 in arr.shape or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError("`batches` must be a non-empty int array (steps, B) of sample "
                         f"indices, got shape {arr.shape} and dtype {arr.dtype}.")
    if steps is not None and arr.shape[0] != steps:
        raise ValueError(f"`batches` has {arr.shape[0]} rows but `steps` = {steps}: one batch "
                         "per step (or leave `steps` out).")
    outside = (arr < 0) | (arr >= P)
    if isinstance(arr, jax.core.Tracer):
        return eqx.error_if(arr, jnp.any(outside),
                            f"`batches` holds sample indices outside [0, {P}).").astype(jnp.int32)
    if bool(jnp.any(outside)):
        lo, hi = int(jnp.min(arr)), int(jnp.max(arr))
        raise ValueError(f"`batches` holds sample indices in [{lo}, {hi}], outside "
                         f"[0, {P}) for P = {P} samples.")
    return arr.astype(jnp.int32)
