"""Crash-safe file writes: a reader (or a restarted run) sees the old file or the whole new one."""

from __future__ import annotations

import os


def atomic_write(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file that is fsynced, then renamed over `path`."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
    """Lays out a matplotlib Figure and saves it as PNG to `path` through a renamed temporary file."""
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
