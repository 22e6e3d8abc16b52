"""Progress lines for whoever runs the command: printed, flushed at once, by process 0 only.

The one way the package reports progress (training steps, evaluation tables, search generations,
restores); warnings about the data or the files go through `logging.warning`.
"""

from __future__ import annotations


def log(*parts: object) -> None:
    """Prints `parts` (as `print` does) on process 0; nothing on the other processes."""
    import jax  # imported here: configs import modules that log, and must not need jax to load

    if jax.process_index() == 0:
        print(*parts, flush=True)
