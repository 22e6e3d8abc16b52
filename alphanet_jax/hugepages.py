"""Transparent huge pages for the host's malloc: a CPU step ~20 % faster, set before the process starts.

XLA's CPU runtime allocates every program's buffers afresh on each run, and glibc serves large blocks
with mmap: each run then faults in its memory page by page (4 KiB), which on the 2-core CPU took ~25 %
of a sandwich step's CPU time (kernel page-fault handling and zeroing). glibc >= 2.35 can ask the
kernel for 2 MiB pages instead (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, with transparent huge pages
in `madvise` or `always` mode): the AlphaNet student program ran in 1.14 s instead of 1.46 s
(benchmarks/RESULTS.md). Tunables are read when a process starts, so `reexec_with_hugepages` restarts
the process once with the tunable set, before anything else is imported. Standard library only.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ALPHANET_HUGEPAGES"  # set to 0 to keep the process as started
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ: dict[str, str] | None = None, libc: tuple[str, str] | None = None,
           thp_mode: str | None = None) -> bool:
    """Whether a restart with the tunable would help: Linux with glibc >= 2.35, transparent huge pages
    not 'never', the tunable not already set, and no opt-out (`ALPHANET_HUGEPAGES=0`)."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False  # set already (by us before the restart, or by the user)
    if not sys.platform.startswith("linux"):
        return False
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        major_minor = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return False
    if name != "glibc" or major_minor < (2, 35):
        return False
    if thp_mode is None:
        try:
            with open(THP_MODE) as f:
                thp_mode = f.read()
        except OSError:
            return False
    return "[never]" not in thp_mode


def reexec_with_hugepages() -> None:
    """Restarts this Python process with glibc's huge-page tunable added to GLIBC_TUNABLES, where
    `wanted()`; returns otherwise. Same interpreter, options, arguments and process id (exec)."""
    if not wanted():
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + list(sys.orig_argv[1:]))
