"""Built-in data: a seeded teacher–student task and scikit-learn's bundled digits."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..model.network import ReLUNet, forward

EXAMPLES_HINT = 'pip install "gramflow[examples]"  (or: pip install scikit-learn matplotlib tqdm)'


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


def load_digits(*, samples: int | None = None, key=None, dtype=None):
    """scikit-learn's bundled 8×8 digits (no download): `X` `(P, 64)` standardized and scaled to
    norm √64 per row, `y = +1` for digits 0–4 and `−1` for 5–9. `samples` rows chosen with
    `key` (default: all 1797). Needs the `examples` extra."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(f"the digits data ship with scikit-learn: {EXAMPLES_HINT}") from err
    data = sk_load_digits()
    X = np.asarray(data.data, np.float64)
    X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-12)
    X = X * np.sqrt(X.shape[1]) / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    y = np.where(data.target < 5, 1.0, -1.0)
    if samples is not None:
        key = jax.random.key(0) if key is None else key
        idx = np.asarray(jax.random.permutation(key, X.shape[0])[:samples])
        X, y = X[idx], y[idx]
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jnp.asarray(X, dtype), jnp.asarray(y, dtype)


def load_data(path, *, split: str = "train", dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Your own data from disk, as numpy arrays `(X, y)` of shapes `(P, d)` and `(P,)` /
    `(P, k)`.

    - a `.npz` file with arrays `X` and `y` (and `X_test`, `y_test` for `split="test"`);
    - a directory holding `X.npy` and `y.npy` (`X_test.npy`, `y_test.npy`): memory-mapped,
      so nothing is read until used — hand a slice of rows to each device or process
      (`jax.make_array_from_callback`) and each reads only its own.

    `dtype` (e.g. `"float32"`) casts, which reads the data; by default the stored dtype is
    kept. Pass the arrays to `simulate`, `sweep` or the kernels like any others
    (`gramflow simulate --data PATH` at the command line).
    """
    import os

    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    names = ("X", "y") if split == "train" else ("X_test", "y_test")
    path = os.fspath(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f"{n}.npy") for n in names]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"`path` {path} is a directory without {missing}: it must "
                                    f"hold {names[0]}.npy and {names[1]}.npy.")
        X, y = (np.load(f, mmap_mode="r") for f in files)
    elif path.endswith(".npz"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"`path`: no file {path}.")
        with np.load(path) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise KeyError(f"{path} has arrays {data.files} but not {missing}; save it "
                               f"with np.savez(path, {names[0]}=..., {names[1]}=...).")
            X, y = data[names[0]], data[names[1]]
    else:
        raise ValueError(f"`path` must be a .npz file or a directory of .npy files, got {path}.")
    if X.ndim != 2 or y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise ValueError(f"{path}: {names[0]} must be (P, d) and {names[1]} (P,) or (P, k) with "
                         f"the same P, got {X.shape} and {y.shape}.")
    for name, a in zip(names, (X, y)):
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{path}: {name} has dtype {a.dtype}; store floating-point arrays "
                            "(for class labels, store one-hot or ±1 targets).")
    if dtype is not None:
        X, y = np.asarray(X, dtype), np.asarray(y, dtype)
    return X, y
