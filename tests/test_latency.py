"""Latency table format, loading checks and the sum-of-entries predictor (no timing values asserted)."""

import json

import pytest

from alphanet_jax import latency
from alphanet_jax.errors import UserError


def _table(**kw):
    t = dict(version=latency.TABLE_VERSION, space_id="tiny", backend="cpu", device_kind="cpu",
             batch_size=2, dtype="float32", entries={"a": 1.5, "b": 0.25}, overhead_ms=0.5)
    t.update(kw)
    return t


def test_round_trip_and_predictor(tmp_path):
    p = str(tmp_path / "t.json")
    latency.save_table(p, _table())
    t = latency.load_table(p, space_id="tiny", batch_size=2, dtype="float32")
    assert t == _table()
    assert latency.predict_from_keys(t, ["a", "b", "a"]) == pytest.approx(1.5 * 2 + 0.25 + 0.5)
    with pytest.raises(UserError, match="no entry"):
        latency.predict_from_keys(t, ["c"])


@pytest.mark.parametrize("kw,match", [(dict(space_id="alphanet"), "space_id='tiny'.*'alphanet'"),
                                      (dict(batch_size=8), "batch_size=2.*batch_size=8"),
                                      (dict(dtype="bfloat16"), "dtype")])
def test_mismatch_errors_name_both_values(tmp_path, kw, match):
    p = str(tmp_path / "t.json")
    latency.save_table(p, _table())
    args = dict(space_id="tiny", batch_size=2, dtype="float32")
    args.update(kw)
    with pytest.raises(UserError, match=match):
        latency.load_table(p, **args)


def test_corrupt_and_malformed_tables(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        latency.load_table(str(p), space_id="tiny", batch_size=2, dtype="float32")
    p.write_text(json.dumps(_table(entries={"a": -1})))
    with pytest.raises(UserError, match="non-negative"):
        latency.load_table(str(p), space_id="tiny", batch_size=2, dtype="float32")
    with pytest.raises(UserError, match="cannot be read"):
        latency.load_table(str(tmp_path / "absent.json"), space_id="tiny", batch_size=2, dtype="float32")
