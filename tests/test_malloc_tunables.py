"""The restart with glibc's huge-page tunable (`alphanet_jax.malloc_tunables`): when, and that it keeps the command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alphanet_jax import malloc_tunables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("env,libc,thp,expected", [
    ({}, GLIBC, MADVISE, True),
    ({}, GLIBC, "[always] madvise never\n", True),
    ({}, GLIBC, "always madvise [never]\n", False),  # the kernel gives no huge pages
    ({}, ("glibc", "2.34"), MADVISE, False),  # no hugetlb tunable before glibc 2.35
    ({}, ("musl", "1.2"), MADVISE, False),
    ({}, ("", ""), MADVISE, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, MADVISE, False),  # the user's own choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, MADVISE, True),
    ({"ALPHANET_HUGEPAGES": "0"}, GLIBC, MADVISE, False),
    ({"ALPHANET_HUGEPAGES": "off"}, GLIBC, MADVISE, False),
])
def test_wanted_only_where_glibc_and_the_kernel_can_and_nobody_chose_otherwise(env, libc, thp, expected):
    if not sys.platform.startswith("linux"):
        expected = False
    assert malloc_tunables.hugepages_wanted(env, libc, thp) is expected


def _restarting_script(tmp_path):
    """A script that restarts itself through `reexec_with_tunables` and prints what it then has."""
    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from alphanet_jax import malloc_tunables\n"
        "print('start', flush=True)\n"
        "malloc_tunables.reexec_with_tunables()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'))\n"
        "print('args', sys.argv[1:], 'orig', sys.orig_argv[1])\n")
    return script


def test_restart_keeps_interpreter_options_arguments_and_other_tunables(tmp_path):
    """The script runs to its end once, after the restart, with its -u option, its arguments and the
    user's other tunables; where the restart is not wanted, once, unchanged."""
    script = _restarting_script(tmp_path)
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    env.pop(malloc_tunables.OPT_OUT, None)
    want = malloc_tunables.hugepages_wanted(env)
    proc = subprocess.run([sys.executable, "-u", str(script), "a b", "--x=1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out.count("start") == (2 if want else 1)
    expected = "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1" if want else "glibc.malloc.arena_max=4"
    assert out[-2:] == [f"tunables {expected}", "args ['a b', '--x=1'] orig -u"]


@pytest.mark.parametrize("env,libc,expected", [
    ({}, GLIBC, False),  # opt-in only: it slows compiles down and keeps the peak memory
    ({"ALPHANET_ONE_ARENA": "1"}, GLIBC, True),
    ({"ALPHANET_ONE_ARENA": "on"}, ("glibc", "2.26"), True),
    ({"ALPHANET_ONE_ARENA": "1"}, ("glibc", "2.25"), False),  # no tunables
    ({"ALPHANET_ONE_ARENA": "1"}, ("musl", "1.2"), False),
    ({"ALPHANET_ONE_ARENA": "0"}, GLIBC, False),
    ({"ALPHANET_ONE_ARENA": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, GLIBC, False),  # the user's
])
def test_one_arena_only_when_asked_for_and_nobody_set_an_arena_count(env, libc, expected):
    if not sys.platform.startswith("linux"):
        expected = False
    assert malloc_tunables.one_arena_wanted(env, libc) is expected


def test_restart_with_one_arena_adds_its_tunables_once(tmp_path):
    script = _restarting_script(tmp_path)
    env = dict(os.environ, ALPHANET_ONE_ARENA="1", ALPHANET_HUGEPAGES="0")
    env.pop("GLIBC_TUNABLES", None)
    want = malloc_tunables.one_arena_wanted(env)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out.count("start") == (2 if want else 1)
    assert out[-2] == "tunables " + (":".join(malloc_tunables.ONE_ARENA_TUNABLES) if want else "None")
