"""An optax transformation as a pytree whose leaves are its hyperparameters.

An optax `GradientTransformation` is a pair of Python closures. Passed to a jitted function as
static configuration it is compared by identity, so every `optax.adam(lr)` — even with the
same numbers — compiles the whole run again. `as_pytree` rebuilds the closures as an
`equinox.Module` tree: the code (and anything that is not a float) is static and compared by
value, the floats the closures captured (learning rate, b1, b2, eps, weight decay, ...) become
array leaves. A new optimizer of the same kind with new hyperparameters then reuses the
compiled program, and the hyperparameters can even be traced (vmapped over, differentiated).

Python control flow on a captured float would fail under tracing; no optax transformation
we know of does that at update time, but if one does, `as_pytree(..., trace_floats=False)`
keeps every float static (one compilation per distinct value).
"""

from __future__ import annotations

import types
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


class _ById:
    """Hash and compare by identity (a module's globals dict, say)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.obj is self.obj


_EMPTY = object()  # an empty closure cell


class _Function(eqx.Module):
    """A Python function rebuilt from its code, globals and (converted) closure cells."""

    code: types.CodeType = eqx.field(static=True)
    globals: _ById = eqx.field(static=True)
    name: str = eqx.field(static=True)
    defaults: Any = eqx.field(static=True)
    kwdefaults: Any = eqx.field(static=True)
    cells: tuple

    def build(self) -> types.FunctionType:
        """The plain Python function, its closure holding the current leaf values."""
        closure = tuple(types.CellType() if c is _EMPTY else types.CellType(_from_tree(c))
                        for c in self.cells)
        fn = types.FunctionType(self.code, self.globals.obj, self.name, self.defaults,
                                closure or None)
        if self.kwdefaults is not None:
            fn.__kwdefaults__ = dict(self.kwdefaults)
        return fn

    def __call__(self, *args, **kwargs):
        return self.build()(*args, **kwargs)


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _to_tree(x, trace_floats: bool):
    if isinstance(x, (_Function, _Static)):  # converted already
        return x
    if isinstance(x, types.FunctionType):
        cells = []
        for c in x.__closure__ or ():
            try:
                cells.append(_to_tree(c.cell_contents, trace_floats))
            except ValueError:  # empty cell
                cells.append(_EMPTY)
        kw = None if x.__kwdefaults__ is None else tuple(sorted(x.__kwdefaults__.items()))
        defaults = x.__defaults__
        if not (_hashable(defaults) and _hashable(kw)):
            return _Static(_ById(x))
        return _Function(x.__code__, _ById(x.__globals__), x.__name__, defaults, kw, tuple(cells))
    if isinstance(x, float) and not isinstance(x, bool) and trace_floats:
        return jnp.asarray(x)  # a weakly typed scalar leaf: keeps the parameters' dtype
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # NamedTuple, e.g. a transformation
        return type(x)(*(_to_tree(v, trace_floats) for v in x))
    if type(x) in (tuple, list):
        return type(x)(_to_tree(v, trace_floats) for v in x)
    if isinstance(x, jax.Array) or x is None:
        return x
    if isinstance(x, (bool, int, str, float)):  # settings: static, part of the structure
        return _Static(x)
    return _Static(x if _hashable(x) else _ById(x))


def _from_tree(x):
    if isinstance(x, _Function):
        return x.build()
    if isinstance(x, _Static):
        return x.value.obj if isinstance(x.value, _ById) else x.value
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_from_tree(v) for v in x))
    if type(x) in (tuple, list):
        return type(x)(_from_tree(v) for v in x)
    return x


def as_pytree(optimizer: optax.GradientTransformation, *, trace_floats: bool = True):
    """`optimizer` with its closures rebuilt as a pytree (see the module docstring). The
    result is still an `optax.GradientTransformation` (the same NamedTuple type), with
    `init` / `update` callables."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
            f"got {type(optimizer).__name__}."
        )
    return _to_tree(optimizer, trace_floats)
