"""Search space, subnet configs, sampling and presets behave as the reference (spec §1, §4, §5.2)."""

import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from alphanet_jax import evolution, flops, presets, sampling, search_space as ss, spaces, widths
from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.search_space import SubnetConfig

ALPHA = ss.get_space("alphanet")
TINY = ss.get_space("tiny")


def test_alphanet_structure_matches_spec_table():
    assert ALPHA.num_blocks == 37
    assert [len(ALPHA.stage_blocks(i)) for i in range(7)] == [2, 5, 6, 6, 8, 8, 2]
    assert list(ALPHA.stage_blocks(5)) == list(range(27, 35))
    shapes = {b.index: (b.max_in, b.max_mid, b.max_out, b.max_se) for b in ALPHA.blocks}
    # spec §1.2 max-size table (in, mid, out, SE hidden)
    assert shapes[0][:3] == (24, 24, 24)
    assert shapes[2][:3] == (24, 144, 32)
    assert shapes[7] == (32, 192, 40, 48)
    assert shapes[8] == (40, 240, 40, 64)
    assert shapes[19] == (72, 432, 128, 112)
    assert shapes[28] == (216, 1296, 216, 328)
    assert shapes[36] == (224, 1344, 224, 336)
    assert ALPHA.head_max_expand == 1344
    assert [b.stride for b in ALPHA.blocks if b.position == 0] == [1, 2, 2, 2, 1, 2, 1]
    assert [len(c) for c in ALPHA.width_choices] == [2, 2, 2, 2, 2, 3, 4, 2, 2]


def test_min_and_max_subnets_are_exact():
    assert ALPHA.max_subnet().to_dict() == dict(
        resolution=288, width=[24, 24, 32, 40, 72, 128, 216, 224, 1984], depth=[2, 5, 6, 6, 8, 8, 2],
        kernel_size=[5] * 7, expand_ratio=[1, 6, 6, 6, 6, 6, 6])
    assert ALPHA.min_subnet().to_dict() == dict(
        resolution=192, width=[16, 16, 24, 32, 64, 112, 192, 216, 1792], depth=[1, 3, 3, 3, 3, 3, 1],
        kernel_size=[3] * 7, expand_ratio=[1, 4, 4, 4, 4, 6, 6])
    assert ALPHA.min_subnet() == presets.preset("a0")  # A0 is the min subnet


@pytest.mark.parametrize("v,expected", [(24, 24), (30, 32), (36, 40), (50, 48), (60, 64), (90, 88), (150, 152),
                                        (180, 184), (300, 304), (324, 328), (336, 336)])
def test_make_divisible_examples(v, expected):
    assert widths.make_divisible(v, 8) == expected


@pytest.mark.parametrize("mid,se", [(96, 24), (120, 32), (144, 40), (240, 64), (360, 88), (600, 152), (720, 184),
                                    (1200, 304), (1296, 328), (1344, 336)])
def test_se_hidden_sizes(mid, se):
    assert widths.make_divisible(mid // 4, 8) == se


def test_json_round_trip_and_extra_keys_ignored():
    rng = random.Random(0)
    for _ in range(20):
        s = sampling.sample_subnet(ALPHA, rng)
        d = json.loads(s.to_json())
        d["flops"] = 123.0
        d["net_id"] = "net_0_evo_0_1"
        assert SubnetConfig.from_dict(d, ALPHA) == s


def test_same_seed_same_subnets_and_reference_draw_order():
    a = sampling.sandwich_subnets(ALPHA, seed=0, step=17)
    b = sampling.sandwich_subnets(ALPHA, seed=0, step=17)
    assert a == b and len(a) == 4
    assert a[0] == ALPHA.max_subnet() and a[-1] == ALPHA.min_subnet()
    assert sampling.sandwich_subnets(ALPHA, seed=0, step=18)[1:3] != a[1:3]
    # Draw order: resolution, 9 widths, 7 depths, 7 kernels, 7 expands, each with rng.choice (31 calls).
    rng, ref = random.Random(5), random.Random(5)
    s = sampling.sample_subnet(ALPHA, rng)
    expected_res = ref.choice(ALPHA.resolutions)
    expected = {f: [ref.choice(c) for c in ALPHA.choices(f)] for f in ("width", "depth", "kernel_size",
                                                                         "expand_ratio")}
    assert s == SubnetConfig(resolution=expected_res, **expected)
    assert rng.random() == ref.random()


def test_every_choice_is_reachable():
    rng = random.Random(1)
    seen = {f: [set() for _ in ALPHA.choices(f)] for f in ("width", "depth", "kernel_size", "expand_ratio")}
    res = set()
    for _ in range(400):
        s = sampling.sample_subnet(ALPHA, rng)
        res.add(s.resolution)
        for f in seen:
            for i, v in enumerate(getattr(s, f)):
                seen[f][i].add(v)
    assert res == set(ALPHA.resolutions)
    for f in seen:
        assert [set(c) for c in ALPHA.choices(f)] == seen[f], f


def test_mutation_with_probability_zero_is_identity_and_one_changes_every_gene():
    rng = random.Random(2)
    for _ in range(20):
        s = sampling.sample_subnet(ALPHA, rng)
        assert evolution.mutate(s, ALPHA, rng, 0.0) == s
        m = evolution.mutate(s, ALPHA, rng, 1.0)
        assert m.resolution != s.resolution
        for f in ("width", "depth", "kernel_size", "expand_ratio"):
            for i, (a, b) in enumerate(zip(getattr(s, f), getattr(m, f))):
                assert (a != b) == (len(ALPHA.choices(f)[i]) > 1)
        m.validate(ALPHA)


def test_crossover_takes_values_only_from_parents():
    rng = random.Random(3)
    for _ in range(30):
        a, b = sampling.sample_subnet(ALPHA, rng), sampling.sample_subnet(ALPHA, rng)
        c = evolution.crossover(a, b, rng)
        assert c.resolution in (a.resolution, b.resolution)
        for f in ("width", "depth", "kernel_size", "expand_ratio"):
            for x, y, z in zip(getattr(a, f), getattr(b, f), getattr(c, f)):
                assert z in (x, y)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lo=st.floats(200, 900))
def test_sampling_within_range_respects_range(seed, lo):
    hi = lo + 150
    s = evolution.sample_subnet_in_range(ALPHA, random.Random(seed), lo, hi)
    assert lo <= flops.count_flops(s) <= hi


def test_sampling_within_impossible_range_errors():
    with pytest.raises(SearchSpaceError, match="no subnet with MFLOPs"):
        evolution.sample_subnet_in_range(TINY, random.Random(0), 1e6, 2e6, max_tries=50)
    with pytest.raises(SearchSpaceError, match="empty"):
        evolution.sample_subnet_in_range(TINY, random.Random(0), 5, 1)


@pytest.mark.parametrize("change,pattern", [
    (dict(resolution=200), r"resolution 200 .* allowed \[192, 224, 256, 288\]"),
    (dict(width=[16, 16, 24, 32, 64, 112, 192, 216]), r"'width' has 8 entries, .* needs 9"),
    (dict(width=[16, 16, 24, 32, 64, 112, 196, 216, 1792]), r"width\[6\] = 196 .*mb6.*\[192, 200, 208, 216\]"),
    (dict(depth=[1, 3, 3, 3, 3, 9, 1]), r"depth\[5\] = 9 .*mb6.*choices \[3, 4, 5, 6, 7, 8\]"),
    (dict(kernel_size=[3, 3, 3, 7, 3, 3, 3]), r"kernel_size\[3\] = 7 .*mb4"),
    (dict(expand_ratio=[2, 4, 4, 4, 4, 6, 6]), r"expand_ratio\[0\] = 2 .*mb1.*choices \[1\]"),
    (dict(depth="123"), r"'depth' must be a list"),
    (dict(depth=[1, 3, "x", 3, 3, 3, 1]), r"'depth' holds 'x'"),
])
def test_validation_errors_name_field_position_value_and_choices(change, pattern):
    d = presets.preset("a0").to_dict()
    d.update(change)
    with pytest.raises(SearchSpaceError, match=pattern):
        SubnetConfig.from_dict(d, ALPHA)


def test_missing_keys_and_unknown_presets():
    with pytest.raises(SearchSpaceError, match="missing"):
        SubnetConfig.from_dict({"resolution": 192}, ALPHA)
    with pytest.raises(SearchSpaceError, match="unknown preset"):
        presets.preset("a9")
    assert presets.preset("A5-base") == presets.preset("a5_1")
    assert presets.as_subnet("max") == ALPHA.max_subnet()


def test_bad_space_definitions_are_refused():
    bad = dict(spaces.TINY_SPACE, stages=[dict(spaces.TINY_SPACE["stages"][0], kernel_sizes=[4])])
    with pytest.raises(SearchSpaceError, match="odd"):
        ss.SearchSpace.from_config(bad)
    with pytest.raises(SearchSpaceError, match="unknown search-space keys"):
        ss.SearchSpace.from_config(dict(spaces.TINY_SPACE, colour="red"))
    assert ss.SearchSpace.from_config(ALPHA.to_dict()) == ALPHA


def test_subnet_files(tmp_path):
    p = tmp_path / "net.json"
    p.write_text(presets.preset("a3").to_json())
    assert presets.as_subnet(str(p)) == presets.preset("a3")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SearchSpaceError, match="not valid JSON"):
        presets.as_subnet(str(tmp_path / "bad.json"))
    with pytest.raises(SearchSpaceError, match="neither a preset"):
        presets.as_subnet(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("name", sorted(spaces.SPACES))
def test_every_registered_space_builds_and_round_trips(name):
    space = ss.get_space(name)
    assert ss.SearchSpace.from_config(space.to_dict()) == space == ss.SearchSpace.from_config(spaces.SPACES[name])
    for s in (space.min_subnet(), space.max_subnet(), sampling.sample_subnet(space, random.Random(0))):
        assert SubnetConfig.from_dict(s.to_dict(), space) == s
    # AttentiveNAS-style spaces keep the reference's subnet dict (no width_mult key)
    assert ("width_mult" in space.max_subnet().to_dict()) == space.is_width_tied


def test_width_tied_sampling_does_not_change_alphanet_draws():
    """The slimmable family is a separate branch: AlphaNet's mutate/crossover draws are the reference's."""
    rng, ref = random.Random(4), random.Random(4)
    a, b = sampling.sample_subnet(ALPHA, rng), sampling.sample_subnet(ALPHA, rng)
    ref_a, ref_b = sampling.sample_subnet(ALPHA, ref), sampling.sample_subnet(ALPHA, ref)
    c = evolution.crossover(a, b, rng)
    # 1 + 9 + 7 + 7 + 7 draws, gene by gene
    res = ref_a.resolution if ref.random() < 0.5 else ref_b.resolution
    lists = {f: [x if ref.random() < 0.5 else y for x, y in zip(getattr(ref_a, f), getattr(ref_b, f))]
             for f in ("width", "depth", "kernel_size", "expand_ratio")}
    assert c == SubnetConfig(resolution=res, **lists) and c.width_mult is None
