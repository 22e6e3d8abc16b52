"""The persistent compilation cache setting (`config.compile_cache`, alphanet_jax/compile_cache.py): which
directory each value names, and a clear error for a directory that cannot be used. That a later step loads
its programs from the cache is tested with the step (tests/test_train.py)."""

import os

import jax
import pytest

from alphanet_jax import compile_cache
from alphanet_jax.errors import ConfigError


def test_auto_prefers_jax_own_setting_then_the_user_cache_directory(tmp_path):
    assert compile_cache.resolve("auto", {"JAX_COMPILATION_CACHE_DIR": "/x/jax"}) == "/x/jax"
    assert compile_cache.resolve("auto", {"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/alphanet_jax/xla"
    assert compile_cache.resolve("auto", {}) == os.path.join(os.path.expanduser("~"), ".cache", "alphanet_jax", "xla")
    assert compile_cache.resolve(" AUTO ", {}) == compile_cache.resolve("auto", {})


@pytest.mark.parametrize("value", ["none", "None", "off", "false", ""])
def test_none_turns_the_cache_off(value):
    assert compile_cache.resolve(value, {"JAX_COMPILATION_CACHE_DIR": "/x/jax"}) is None


def test_a_directory_is_made_absolute_and_remote_paths_pass_through(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert compile_cache.resolve("rel/dir", {}) == str(tmp_path / "rel" / "dir")
    assert compile_cache.resolve("~/c", {}) == os.path.join(os.path.expanduser("~"), "c")
    assert compile_cache.resolve("gs://bucket/xla", {}) == "gs://bucket/xla"


@pytest.mark.parametrize("value", [None, 0, True, ["dir"]])
def test_a_value_that_is_not_a_string_is_a_config_error(value):
    with pytest.raises(ConfigError, match="compile_cache"):
        compile_cache.resolve(value, {})


def test_an_unusable_directory_is_an_error_but_auto_only_turns_the_cache_off(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    try:
        with pytest.raises(ConfigError, match="a_file"):
            compile_cache.enable(str(blocker / "xla"))  # under a file: cannot be made
        assert jax.config.jax_compilation_cache_dir == before  # nothing changed
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
        assert compile_cache.enable("auto") is None
        assert not jax.config.jax_enable_compilation_cache
        made = compile_cache.enable(str(tmp_path / "new" / "xla"))
        assert made == str(tmp_path / "new" / "xla") and os.path.isdir(made)
        assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == made
    finally:
        compile_cache.enable(before or "none")
