"""The universally slimmable MobileNetV2 family (issue 10): space, FLOPs, sampling, masked supernet, config."""

import collections
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import (evaluate, evolution, export, flops, presets, sampling, search_space as ss, spaces, supernet,
                          widths)
from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.resolve import resolve
from alphanet_jax.search_space import SubnetConfig
from alphanet_jax.subnet_encoding import encode

SLIM = ss.get_space("slimmable_mobilenet_v2")
TINY = ss.get_space("tiny_slimmable")

# MobileNetV2 (Sandler et al. 2018, table and TF-slim model zoo): multiply-adds in M and params in M
# (the published params leave out BN's affine parameters).
PUBLISHED = {1.0: (300, 3.47), 0.75: (209, 2.61), 0.5: (97, 1.95), 0.35: (59, 1.66)}


def _bn_channels(s, space):
    rs = resolve(s, space)
    return rs.stem_width + sum((b.mid if b.has_expand else 0) + b.mid + b.out_ch for b in rs.blocks) + rs.head_expand


# ----------------------------------------------------------------------------
# Space and FLOPs
# ----------------------------------------------------------------------------


def test_structure_is_mobilenet_v2():
    assert SLIM.num_blocks == 17 and SLIM.resolutions == (224,) and SLIM.head_kind == "v2"
    assert SLIM.act == "relu6" and SLIM.shortcut == "identity_when_same"
    full = SLIM.width_subnet(1.0)
    assert full.to_dict() == dict(resolution=224, width_mult=1.0, width=[32, 16, 24, 32, 64, 96, 160, 320, 1280],
                                  depth=[1, 2, 3, 4, 3, 3, 1], kernel_size=[3] * 7, expand_ratio=[1, 6, 6, 6, 6, 6, 6])
    rs = resolve(full, SLIM)
    assert [b.stride for b in rs.blocks] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert [(b.in_ch, b.mid, b.out_ch) for b in rs.blocks[:3]] == [(32, 32, 16), (16, 96, 24), (24, 144, 24)]
    assert not rs.blocks[0].has_expand and all(b.has_expand for b in rs.blocks[1:])
    # residual add only with stride 1 and in == out: 10 of the 17 blocks, no shortcut layers anywhere
    kinds = [b.shortcut for b in rs.blocks]
    assert kinds.count("identity") == 10 and set(kinds) == {"identity", "none"}
    assert rs.head_in == 320 and rs.head_expand == rs.head_width == 1280
    assert SLIM.width_subnet(0.35).width == (16, 8, 8, 16, 24, 32, 56, 112, 1280)
    assert SLIM.min_subnet() == SLIM.width_subnet(0.35) and SLIM.max_subnet() == full
    assert len(SLIM.width_multipliers) == 27 and SLIM.width_multipliers[0] == 0.35


def test_flops_and_params_match_published_mobilenet_v2():
    """1.0x: 300.774272 MFLOPs (published 300 M MACs), 3,504,872 params with BN (torchvision's
    mobilenet_v2 exactly), 3,470,760 without BN affine (published 3.47 M); 0.35x: 59.29 MFLOPs (59 M)."""
    full, low = SLIM.width_subnet(1.0), SLIM.width_subnet(0.35)
    assert flops.count_flops(full, SLIM) == pytest.approx(300.774272, abs=1e-9)
    assert flops.count_params(full, SLIM) == 3_504_872
    assert flops.count_flops(low, SLIM) == pytest.approx(59.285808, abs=1e-9)
    for m, (mflops, mparams) in PUBLISHED.items():
        s = SLIM.width_subnet(m)
        assert flops.count_flops(s, SLIM) == pytest.approx(mflops, rel=0.01), m  # within 1 %
        no_bn = flops.count_params(s, SLIM) - 2 * _bn_channels(s, SLIM)
        assert no_bn / 1e6 == pytest.approx(mparams, abs=0.005), m  # to the published 2 decimals
    assert 3.4e6 <= flops.count_params(full, SLIM) <= 3.55e6
    names = [n for n, _ in flops.layer_flops(full, SLIM)]
    assert "head.feature_mix" not in names and not any(n.endswith(".shortcut") for n in names)
    assert flops.count_params(full, SLIM, include_unused_shortcuts=True) == 3_504_872


def test_flops_increase_with_the_multiplier():
    values = [flops.count_flops(SLIM.width_subnet(m), SLIM) for m in SLIM.width_multipliers]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_widths_are_make_divisible_of_one_multiplier():
    bases = [32, 16, 24, 32, 64, 96, 160, 320]
    for m in SLIM.width_multipliers:
        s = SLIM.width_subnet(m)
        assert list(s.width[:-1]) == [widths.make_divisible(round(b * m, 6), 8) for b in bases]
        assert s.width[-1] == 1280
    # float noise cannot move a value on a rounding boundary: 200 x 0.58 = 116 -> 120
    assert 200 * 0.58 < 116 and widths.make_divisible(200 * 0.58) == 112 and widths.scaled_width(200, 0.58) == 120


def test_space_dict_round_trips_and_alphanet_dict_is_unchanged():
    for sp in (SLIM, TINY):
        assert ss.SearchSpace.from_config(sp.to_dict()) == sp
        d = sp.to_dict()
        assert d["stages"][0]["base_width"] == sp.width_bases[1] and "widths" not in d["stages"][0]
        assert d["head"] == {"kind": "v2", "widths": list(sp.head_widths)}
    alpha = ss.get_space("alphanet").to_dict()
    assert "width_multipliers" not in alpha and alpha == ss.SearchSpace.from_config(spaces.ALPHANET_SPACE).to_dict()
    assert set(alpha) == set(spaces.ALPHANET_SPACE) and alpha["head"] == spaces.ALPHANET_SPACE["head"]
    assert "slimmable_mobilenet_v2" in spaces.SPACES and "tiny_slimmable" in spaces.SPACES
    assert "width multiplier" in SLIM.describe()


@pytest.mark.parametrize("change,pattern", [
    (dict(width_multipliers=None), "'base_width' needs the space's 'width_multipliers'"),
    (dict(width_multipliers=[0.5, 0.35]), "increasing"),
    (dict(width_multipliers=[0.35, 0.36]), "give the same widths"),
    (dict(stem=dict(base_width=32, widths=[32], kernel_size=3, stride=2)), "exactly one of 'widths'"),
    (dict(head=dict(kind="v2", widths=[128], expand_ratio=6)), r"unknown keys \['expand_ratio'\]"),
    (dict(head=dict(kind="v4", widths=[128])), "head kind 'v4'"),
    (dict(shortcut="sometimes"), "shortcut 'sometimes'"),
])
def test_bad_slimmable_space_definitions_are_refused(change, pattern):
    d = dict(spaces.TINY_SLIMMABLE_SPACE, **change)
    if d["width_multipliers"] is None:
        del d["width_multipliers"]
    with pytest.raises(SearchSpaceError, match=pattern):
        ss.SearchSpace.from_config(d)


# ----------------------------------------------------------------------------
# Subnet configs and sampling
# ----------------------------------------------------------------------------


def test_sandwich_is_max_random_min_and_random_widths_are_uniform():
    a = sampling.sandwich_subnets(SLIM, seed=0, step=3)
    assert a[0] == SLIM.width_subnet(1.0) and a[-1] == SLIM.width_subnet(0.35) and len(a) == 4
    assert a == sampling.sandwich_subnets(SLIM, seed=0, step=3)
    rng = random.Random(0)
    counts = collections.Counter()
    n = 27 * 200
    for _ in range(n):
        s = sampling.sample_subnet(SLIM, rng)
        assert s.width == SLIM.width_subnet(s.width_mult).width
        counts[s.width_mult] += 1
    assert set(counts) == set(SLIM.width_multipliers)
    # uniform: chi-square with 26 degrees of freedom, far below the 0.1 % critical value (54.05)
    chi2 = sum((c - n / 27) ** 2 / (n / 27) for c in counts.values())
    assert chi2 < 54.05, counts


def test_mutation_and_crossover_keep_one_consistent_multiplier():
    rng = random.Random(1)
    for _ in range(50):
        s = sampling.sample_subnet(SLIM, rng)
        assert evolution.mutate(s, SLIM, rng, 0.0) == s
        m = evolution.mutate(s, SLIM, rng, 1.0)
        assert m.width_mult != s.width_mult and m.width == SLIM.width_subnet(m.width_mult).width
        m.validate(SLIM)
        b = sampling.sample_subnet(SLIM, rng)
        c = evolution.crossover(s, b, rng)
        assert (c.width, c.width_mult) in ((s.width, s.width_mult), (b.width, b.width_mult))
        c.validate(SLIM)
    # a mutant of a dict without width_mult (the reference format) is still consistent
    plain = SLIM.width_subnet(0.5).to_dict()
    del plain["width_mult"]
    m = evolution.mutate(SubnetConfig.from_dict(plain), SLIM, rng, 1.0)
    assert m.width == SLIM.width_subnet(m.width_mult).width


def test_dict_forms_and_names():
    s = SLIM.width_subnet(0.5)
    assert SubnetConfig.from_json(s.to_json(), SLIM) == s
    plain = {k: v for k, v in s.to_dict().items() if k != "width_mult"}
    assert SubnetConfig.from_dict(plain, SLIM) == s  # width_mult inferred from the widths
    assert SubnetConfig.from_dict(plain) != s  # without the space nothing is inferred
    assert SubnetConfig.from_dict({"resolution": 224, "width_mult": 0.5}, SLIM) == s
    assert presets.as_subnet("0.5x", SLIM) == s and presets.as_subnet("1.0x", SLIM) == SLIM.max_subnet()
    assert presets.as_subnet(SubnetConfig.from_dict(plain), SLIM) == s
    assert presets.as_subnet("min", SLIM) == SLIM.width_subnet(0.35)
    assert "width_mult" not in presets.preset("a0").to_dict()


@pytest.mark.parametrize("make,pattern", [
    (lambda: SLIM.width_subnet(0.5).replace(width=SLIM.width_subnet(0.75).width[:4] + SLIM.width_subnet(0.5).width[4:],
                                            width_mult=None),
     r"is not the width of one multiplier .* widths are tied"),
    (lambda: SLIM.width_subnet(0.5).replace(width_mult=0.75),
     r"does not match its width_mult 0.75 .*width\[0\] \(stem\) = 16, expected make_divisible\(32 x 0.75, 8\) = 24"),
    (lambda: SLIM.width_subnet(0.5).replace(width_mult=0.33), r"width multiplier 0.33 is not in space"),
    (lambda: SLIM.width_subnet(0.5).replace(resolution=192), r"resolution 192 .* allowed \[224\]"),
    (lambda: SLIM.width_subnet(0.5).replace(width=(32, 16, 24, 32, 64, 96, 160, 320, 1024)),
     r"width\[8\] = 1024 .*head.*choices \[1280\]"),
    (lambda: SLIM.width_subnet(0.5).replace(width_mult=-1.0), "must be positive"),
])
def test_validation_errors_are_clear(make, pattern):
    with pytest.raises(SearchSpaceError, match=pattern):
        make().validate(SLIM)


def test_multiplier_names_and_fields_are_refused_elsewhere():
    alpha = ss.get_space("alphanet")
    with pytest.raises(SearchSpaceError, match="has no width multipliers"):
        presets.as_subnet("0.5x", alpha)
    with pytest.raises(SearchSpaceError, match="has no width multipliers"):
        presets.preset("a0").replace(width_mult=1.0).validate(alpha)
    with pytest.raises(SearchSpaceError, match="width multiplier 0.3 is not in space"):
        presets.as_subnet("0.3x", SLIM)
    with pytest.raises(SearchSpaceError, match="missing"):
        SubnetConfig.from_dict({"resolution": 224}, SLIM)


def test_flops_window_sampling():
    s = evolution.sample_subnet_in_range(SLIM, random.Random(0), 90, 110)
    assert 90 <= flops.count_flops(s, SLIM) <= 110 and s.width_mult in (0.475, 0.5, 0.525, 0.55)


# ----------------------------------------------------------------------------
# Masked supernet == static export
# ----------------------------------------------------------------------------


def _lively(space, seed):
    """Fresh variables with random BN affine parameters and running statistics (no extra compile)."""
    v = jax.device_get(supernet.init_variables(space, seed=seed))
    rng = np.random.RandomState(seed)  # numpy: hundreds of eager jax ops would each compile

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "bn" not in name:
            return x
        u = rng.uniform(size=x.shape).astype(np.float32)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return 0.5 + u
        return x + 0.2 * (u - 0.5)  # bias, mean

    return {"params": jax.tree_util.tree_map_with_path(perturb, v["params"]),
            "batch_stats": jax.tree_util.tree_map_with_path(perturb, v["batch_stats"])}


@pytest.fixture(scope="module")
def tiny_vars():
    return _lively(TINY, 1)


def _compare(space, variables, subnets, x, rtol):
    """Eval- and train-mode logits of the masked supernet and of the static export, per subnet."""
    model = supernet.Supernet(space=space)
    traces = []

    def both(v, x, enc):
        traces.append(enc.resolution)
        return model.apply(v, x, enc, train=False), model.apply(v, x, enc, train=True)

    f = jax.jit(both)
    for s in subnets:
        masked = f(variables, x, encode(s, space))
        m, sv = export.extract_subnet(variables, s, space)
        static = jax.jit(lambda v, x, m=m: (m.apply(v, x, train=False), m.apply(v, x, train=True)))(sv, x)
        for mode, a, b in zip(("eval", "train"), np.asarray(masked), np.asarray(static)):
            err = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6))
            assert err < rtol, (s.to_dict(), mode, err)
            assert float(np.std(b)) > 1e-3  # the comparison is not between constants
        assert export.num_params(sv) == flops.count_params(s, space)
        assert "shortcut" not in str(jax.tree_util.tree_structure(sv))
    assert traces == [space.resolutions[0]] and f._cache_size() == 1  # one program for every width


def test_masked_equals_static_tiny_every_width(tiny_vars):
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 24, 24, 3))
    _compare(TINY, tiny_vars, [TINY.width_subnet(m) for m in TINY.width_multipliers], x, rtol=1e-5)


def test_masked_equals_static_mobilenet_v2_at_random_widths():
    """Five random widths of the full space, eval and train mode, at 224 (the model resizes the 32x32
    input), batch 2; the tiny space above covers both ends."""
    ms = random.Random(10).sample(SLIM.width_multipliers, 5)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 32, 32, 3))
    _compare(SLIM, _lively(SLIM, 2), [SLIM.width_subnet(m) for m in ms], x, rtol=1e-4)


def test_inactive_weights_get_exactly_zero_gradient(tiny_vars):
    model = supernet.Supernet(space=TINY)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 24, 24, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, TINY.num_classes))
    grad = jax.jit(lambda p, enc: jax.grad(
        lambda p: jnp.sum(model.apply({**tiny_vars, "params": p}, x, enc, train=True) * w))(p))
    for m in (0.35, 0.75):
        s = TINY.width_subnet(m)
        g = jax.device_get(grad(tiny_vars["params"], encode(s, TINY)))
        rs = resolve(s, TINY)

        def peak(x):
            return float(np.abs(x).max(initial=0))

        assert peak(g["stem"]["kernel"][..., rs.stem_width:]) == 0 and peak(g["stem"]["kernel"]) > 0
        for a in rs.blocks:
            gb = g[f"block{a.index}"]
            if a.has_expand:
                assert peak(gb["expand"]["kernel"][a.in_ch:]) == 0
                assert peak(gb["expand"]["kernel"][:, a.mid:]) == 0
                assert peak(gb["expand_bn"]["scale"][a.mid:]) == 0
            assert peak(gb["dw"]["kernel"][..., a.mid:]) == 0
            assert peak(gb["project"]["kernel"][a.mid:]) == 0
            assert peak(gb["project"]["kernel"][:, a.out_ch:]) == 0
            assert peak(gb["project_bn"]["bias"][a.out_ch:]) == 0
            assert peak(gb["project"]["kernel"][:a.mid, :a.out_ch]) > 0
        assert peak(g["head"]["expand"]["kernel"][rs.head_in:]) == 0 and peak(g["head"]["expand"]["kernel"]) > 0
        assert peak(g["classifier"]["kernel"]) > 0 and "feature_mix" not in g["head"]


def test_residual_follows_active_widths_when_widths_are_independent():
    """'identity_when_same' with untied widths: a stride-1 first block adds its input only when the
    subnet's in and out widths agree (decided at run time, one program)."""
    d = dict(spaces.TINY_SLIMMABLE_SPACE, name="untied", width_multipliers=None,
             stem=dict(widths=[16, 24], kernel_size=3, stride=2),
             stages=[dict(name="a", widths=[16, 24], depths=[1], kernel_sizes=[3], expand_ratios=[2], stride=1,
                          se=False)], head=dict(kind="v2", widths=[32]))
    del d["width_multipliers"]
    sp = ss.SearchSpace.from_config(d)
    v = _lively(sp, 3)
    subnets = [SubnetConfig(resolution=24, width=w, depth=[1], kernel_size=[3], expand_ratio=[2])
               for w in ([16, 16, 32], [16, 24, 32], [24, 16, 32], [24, 24, 32])]
    assert [resolve(s, sp).blocks[0].shortcut for s in subnets] == ["identity", "none", "none", "identity"]
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 24, 24, 3))
    _compare(sp, v, subnets, x, rtol=1e-5)


def test_per_width_bn_calibration_touches_only_that_width(tiny_vars):
    """Calibrating one width rewrites its channels' statistics with the static subnet's batch statistics."""
    model = supernet.Supernet(space=TINY)
    s = TINY.width_subnet(0.5)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (16, 24, 24, 3)))
    cal = evaluate.calibrate_bn(model, tiny_vars, s, [{"image": x}])
    rs = resolve(s, TINY)
    old, new = tiny_vars["batch_stats"], jax.device_get(cal["batch_stats"])
    m, sv = export.extract_subnet(tiny_vars, s, TINY)
    _, st = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(sv, jnp.asarray(x))
    for j, a in enumerate(rs.blocks):
        ob, nb = old[f"block{a.index}"]["project_bn"], new[f"block{a.index}"]["project_bn"]
        np.testing.assert_array_equal(nb["mean"][a.out_ch:], ob["mean"][a.out_ch:])
        np.testing.assert_allclose(nb["mean"][:a.out_ch], st["batch_stats"][f"blocks{j}"]["project_bn"]["mean"],
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["head"]["expand_bn"]["var"], st["batch_stats"]["head"]["expand_bn"]["var"],
                               rtol=1e-4, atol=1e-5)


def test_exported_slimmable_subnet_round_trip(tmp_path, tiny_vars):
    s = TINY.width_subnet(0.75)
    m, sv = export.extract_subnet(tiny_vars, s, TINY)
    export.save_subnet(str(tmp_path / "net"), m, sv)
    m2, sv2 = export.load_subnet_model(str(tmp_path / "net"))
    assert m2.subnet == s and m2.space == TINY
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 24, 3))
    np.testing.assert_array_equal(np.asarray(jax.jit(m.apply)(sv, x)), np.asarray(jax.jit(m2.apply)(sv2, x)))


def test_converter_refuses_the_slimmable_space():
    from alphanet_jax import convert
    with pytest.raises(ValueError, match="no AttentiveNAS/AlphaNet PyTorch checkpoint format"):
        convert.tensor_specs(SLIM)


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def test_configs():
    from configs import slimmable_mobilenet_v2 as cfg

    c = cfg.get_config()
    space = ss.get_space(c.space)
    assert space == SLIM and c.batch_size == 1024 and c.num_epochs == 250
    assert c.data.image_size == 224 and c.sandwich.num_arch_training == 4
    names = c.eval.subnets.split(",")
    assert [presets.as_subnet(n, space).width_mult for n in names] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35]
    lo, hi = flops.count_flops(SLIM.min_subnet(), SLIM), flops.count_flops(SLIM.max_subnet(), SLIM)
    assert c.search.flops_min <= lo and hi <= c.search.flops_max
    d = cfg.get_config("digits")
    tiny = ss.get_space(d.space)
    assert tiny == TINY and d.data.source == "digits" and d.run == "train,evaluate,search,export"
    assert d.data.image_size in tiny.resolutions
    assert {presets.as_subnet(n, tiny).width_mult for n in d.eval.subnets.split(",")} == set(TINY.width_multipliers)
    assert cfg.get_config("digits,steps=20").total_steps == 20
    with pytest.raises(ValueError, match="unknown config argument"):
        cfg.get_config("colour=red")
