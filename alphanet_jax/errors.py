"""The package's error types: one hierarchy, so the command line can tell a bad input from a bug.

`launch.py` prints an `AlphanetError` as one line (`alphanet-jax: error: ...`, exit status 2); any
other exception is a bug and keeps its traceback. `UserError` keeps `ValueError` as a base (and
`PathNotFoundError` `FileNotFoundError`), so callers that catch those still do.
"""

from __future__ import annotations

import errno
import os


class AlphanetError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(AlphanetError, ValueError):
    """A bad input: config value, subnet, dataset, checkpoint, path."""


class ConfigError(UserError):
    """A config value that cannot work (the message names the key)."""


class SearchSpaceError(ConfigError):
    """A search space definition or a subnet config does not fit its space."""


class DataError(UserError):
    """A dataset that cannot be used (layout, classes, no decodable image)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle names a global that could execute code; nothing was executed."""


class CheckpointMismatchError(CheckpointError):
    """The state dict does not fit the search space: missing, mis-shaped or unexpected tensors."""


class WorkdirError(UserError):
    """A workdir that is not a writable directory, or a write to it that failed (e.g. a full disk)."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or directory named by the user does not exist."""


class MissingDependencyError(AlphanetError, ImportError):
    """An optional dependency that this input needs is not installed (the message says how to install it)."""


class TrainingError(AlphanetError, RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_error_message(e: OSError, where: str | None = None) -> str:
    """One line for a failed file operation, naming the path (`where` when the error names none)."""
    if e.errno is None or not (e.filename or where):  # raised with a message of our own, or names no path
        return str(e)
    return f"{e.strerror or e}: {e.filename or where}" + (f" -> {e.filename2}" if e.filename2 else "")


def disk_full_message(e: BaseException, workdir: str) -> str | None:
    """One line naming `workdir` if `e` (or an error it came from) reports a full disk, else None.

    A full disk arrives as an OSError (ENOSPC, EDQUOT) from Python's writes, or as the ValueError
    that Orbax passes on from TensorStore: "RESOURCE_EXHAUSTED: ... No space left on device
    [os_error_code='28']".
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(
                os.strerror(n) in text or f"os_error_code='{n}'" in text for n in DISK_FULL_ERRNOS):
            reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else "No space left on device"
            where = getattr(e, "filename", None) or f"to --workdir {workdir}"
            return (f"{reason} while writing {where}: free some space, or use a --workdir on another disk "
                    f"(complete checkpoints are kept: rerun the same command to resume)")
        e = e.__cause__ or e.__context__
    return None
