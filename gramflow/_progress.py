"""Progress bars for long Python-level loops (tqdm when installed, else silent)."""

from __future__ import annotations


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, *, desc: str, unit: str = "run"):
    """A tqdm bar of `total` steps, or a silent stand-in when disabled or without tqdm."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the `examples` extra
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)
