"""The installed version of gramflow, and the versions every results file records."""

import importlib.metadata
import platform

import jax

try:
    __version__ = importlib.metadata.version("gramflow")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

_RECORDED = ("jax", "jaxlib", "equinox", "optax", "diffrax", "numpy")


def versions() -> dict:
    """`{"gramflow": ..., "python": ..., "jax": ..., "jaxlib": ..., "equinox": ..., "optax":
    ..., "diffrax": ..., "numpy": ..., "backend": ...}`: what produced a result."""
    out = {"gramflow": __version__, "python": platform.python_version()}
    for name in _RECORDED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["backend"] = jax.default_backend()
    return out
