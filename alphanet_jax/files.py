"""Crash-safe file writes: a reader (or a restarted run) sees the old file or the whole new one."""

from __future__ import annotations

import os


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes `data` (text or bytes) to `path` through a temporary file that is fsynced, then renamed
    over `path`."""
    tmp = path + ".tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
    """Lays out a matplotlib Figure and saves it as PNG to `path` (`atomic_write`)."""
    import io

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write(path, png.getvalue())
