"""glibc malloc tunables for XLA's CPU runtime, set by restarting the process once before anything is imported.

Huge pages (default): a CPU step ~20 % faster.

XLA's CPU runtime allocates every program's buffers afresh on each run, and glibc serves large blocks
with mmap: each run then faults in its memory page by page (4 KiB), which on the 2-core CPU took ~25 %
of a sandwich step's CPU time (kernel page-fault handling and zeroing). glibc >= 2.35 can ask the
kernel for 2 MiB pages instead (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, with transparent huge pages
in `madvise` or `always` mode): the AlphaNet student program ran in 1.14 s instead of 1.46 s
(benchmarks/RESULTS.md). Tunables are read when a process starts, so `reexec_with_tunables` restarts
the process once with the tunable set, before anything else is imported. Standard library only.

Opt-in, `ALPHANET_ONE_ARENA=1`: also one malloc arena that never returns memory (`ONE_ARENA_TUNABLES`),
so XLA's per-run buffers come from memory the process already has: no page faults at all after the
first steps. AlphaNet CPU step (fp32, batch 8) 5.75 -> 4.9-5.1 s, but compiling takes ~40 % longer (every
compile thread then shares one arena's lock: 114 -> 162 s cold), the process keeps its peak memory
(max RSS 4.5 -> 8.9 GB) and A0 calibration/evaluation runs ~28 % slower, so it pays off only for long CPU
training runs (benchmarks/RESULTS.md, session 11).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ALPHANET_HUGEPAGES"  # set to 0 to keep the process as started
ONE_ARENA = "ALPHANET_ONE_ARENA"  # set to 1 to add ONE_ARENA_TUNABLES (see the module doc)
# One arena (the main one, grown with brk), no mmap'd chunks, memory never trimmed back to the kernel.
ONE_ARENA_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                      "glibc.malloc.trim_threshold=68719476736")
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugepages_wanted(environ: dict[str, str] | None = None, libc: tuple[str, str] | None = None,
                     thp_mode: str | None = None) -> bool:
    """Whether a restart with the tunable would help: Linux with glibc >= 2.35, transparent huge pages
    not 'never', the tunable not already set, and no opt-out (`ALPHANET_HUGEPAGES=0`)."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False  # set already (by us before the restart, or by the user)
    if not sys.platform.startswith("linux") or not _glibc_at_least(libc, (2, 35)):
        return False
    if thp_mode is None:
        try:
            with open(THP_MODE) as f:
                thp_mode = f.read()
        except OSError:
            return False
    return "[never]" not in thp_mode


def one_arena_wanted(environ: dict[str, str] | None = None, libc: tuple[str, str] | None = None) -> bool:
    """Whether to add ONE_ARENA_TUNABLES: asked for (`ALPHANET_ONE_ARENA=1`), Linux with glibc >= 2.26
    (tunables), and no arena count of the user's own in GLIBC_TUNABLES."""
    env = os.environ if environ is None else environ
    if env.get(ONE_ARENA, "0").strip().lower() not in ("1", "true", "on", "yes"):
        return False
    if "glibc.malloc.arena_max" in env.get("GLIBC_TUNABLES", "") or not sys.platform.startswith("linux"):
        return False
    return _glibc_at_least(libc, (2, 26))


def _glibc_at_least(libc: tuple[str, str] | None, version: tuple[int, int]) -> bool:
    name, have = libc if libc is not None else platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(v) for v in have.split(".")[:2]) >= version
    except ValueError:
        return False


def reexec_with_tunables() -> None:
    """Restarts this Python process with glibc's huge-page tunable added to GLIBC_TUNABLES, where
    `hugepages_wanted()`, and ONE_ARENA_TUNABLES, where `one_arena_wanted()`; returns otherwise. Same
    interpreter, options, arguments and process id (exec)."""
    add = ([TUNABLE] if hugepages_wanted() else []) + (list(ONE_ARENA_TUNABLES) if one_arena_wanted() else [])
    if not add:
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + add)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + list(sys.orig_argv[1:]))
