"""The installed version of gramflow."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("gramflow")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
