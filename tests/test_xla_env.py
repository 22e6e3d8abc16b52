"""The tests' XLA_FLAGS (tests/xla_env.py): the fast-compile flag only where this XLA accepts it."""

import os

import xla_env


def test_a_flag_xla_refuses_is_left_out(monkeypatch):
    # XLA aborts the process on an unknown flag: the probe must notice and drop it, not pass it on.
    monkeypatch.delenv(xla_env._PROBED, raising=False)
    monkeypatch.setattr(xla_env, "FAST_COMPILE_FLAGS", "--xla_alphanet_tests_no_such_flag=true")
    assert xla_env.xla_flags(3) == "--xla_force_host_platform_device_count=3"
    assert os.environ[xla_env._PROBED] == ""
