"""Built-in data: a seeded teacher–student task."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._network import ReLUNet, forward


def teacher_student(
    key: PRNGKeyArray,
    *,
    samples: int = 64,
    in_dim: int = 8,
    widths: Sequence[int] = (16,),
    out_dim: int | None = None,
    noise: float = 0.0,
    dtype=None,
) -> tuple[Float[Array, "P d"], Float[Array, "P *k"]]:
    """Inputs on the sphere of radius √d and targets from a random NTK-parametrized teacher.

    `X[μ] ~ Uniform(√d · S^{d-1})`, `y = f_teacher(X) + noise · ε` with `ε ~ N(0, 1)`.

    **Arguments:** `key`; `samples` P; `in_dim` d; the teacher's hidden `widths`; `out_dim`
    (`None`: `y` of shape `(P,)`, else `(P, k)`); label `noise`; `dtype` (default: JAX's
    default floating dtype).

    **Returns:** `(X, y)` with `X` of shape `(P, d)`.
    """
    kx, kt, kn = jax.random.split(key, 3)
    teacher = ReLUNet.init(kt, in_dim, widths, out_dim=out_dim, dtype=dtype)
    X = jax.random.normal(kx, (samples, in_dim), teacher.dtype)
    X = X * jnp.sqrt(in_dim) / jnp.linalg.norm(X, axis=1, keepdims=True)
    y = forward(teacher, X)[-1]
    return X, y + noise * jax.random.normal(kn, y.shape, y.dtype)
