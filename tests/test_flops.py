"""FLOPs and parameter counts equal the reference's numbers (spec §5)."""

import random
import sys

import pytest

from alphanet_jax import flops, presets, sampling, search_space as ss

# spec §5.2: MFLOPs (rounded to 2 decimals there), params in M with and without dead shortcut convs.
TABLE = {
    "a0": (203.39, 9.065, 8.954), "a1": (279.24, 9.563, 9.453), "a2": (316.73, 11.307, 11.150),
    "a3": (356.52, 12.999, 12.785), "a4": (443.53, 11.998, 11.810), "a5": (491.48, 13.197, 12.971),
    "a5_1": (594.79, 12.602, 12.404), "a6": (709.01, 15.441, 15.155),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_match_reference_table(name):
    mflops, p_profile, p_live = TABLE[name]
    s = presets.preset(name)
    # The table gives 2 decimals; exact values agree to the last printed digit.
    assert round(flops.count_flops(s), 2) == pytest.approx(mflops, abs=1e-9)
    assert round(flops.count_params(s, include_unused_shortcuts=True) / 1e6, 3) == pytest.approx(p_profile)
    assert round(flops.count_params(s) / 1e6, 3) == pytest.approx(p_live)


def test_max_subnet():
    m = ss.get_space().max_subnet()
    assert flops.count_flops(m) == pytest.approx(1939.34, abs=5e-3)
    assert flops.count_params(m, include_unused_shortcuts=True) == 23_934_704


def test_a0_worked_example_per_block():
    """spec §5.2 worked example, per layer group, to 3 decimals."""
    layers = flops.layer_flops(presets.preset("a0"))
    per = {}
    for name, v in layers:
        key = name.split(".")[0]
        per[key] = per.get(key, 0.0) + v / 1e6
    expected = {"stem": 3.981, "block0": 3.686, "block2": 15.188, "block3": 12.607, "block4": 12.607,
                "block7": 8.023, "block8": 5.390, "block13": 4.000, "block14": 5.050, "block19": 7.885,
                "block20": 15.132, "block27": 16.701, "block28": 16.962, "block35": 19.450}
    for k, v in expected.items():
        assert per[k] == pytest.approx(v, abs=1e-3), k
    heads = dict(layers)
    assert heads["head.final_expand"] / 1e6 == pytest.approx(10.078, abs=1e-3)
    assert heads["head.feature_mix"] / 1e6 == pytest.approx(2.322, abs=1e-3)
    assert heads["classifier"] / 1e6 == pytest.approx(1.792, abs=1e-3)
    assert flops.count_flops(presets.preset("a0")) == pytest.approx(203.390, abs=1e-3)


def test_attentivenas_a5_differs():
    a5 = ss.SubnetConfig(resolution=256, width=[16, 16, 24, 32, 72, 112, 192, 216, 1792],
                         kernel_size=[3, 3, 3, 5, 3, 3, 3], expand_ratio=[1, 4, 5, 4, 4, 6, 6],
                         depth=[1, 3, 3, 3, 4, 6, 1])
    assert round(flops.count_flops(a5), 2) == 490.52
    assert round(flops.count_params(a5, include_unused_shortcuts=True) / 1e6, 3) == 12.833


def test_flops_monotone_in_every_gene():
    """Growing any single gene never lowers FLOPs (a sanity property of the counter)."""
    space = ss.get_space()
    rng = random.Random(0)
    for _ in range(30):
        s = sampling.sample_subnet(space, rng)
        base = flops.count_flops(s)
        for f in ("width", "depth", "kernel_size", "expand_ratio"):
            for i, cands in enumerate(space.choices(f)):
                bigger = [c for c in cands if c > getattr(s, f)[i]]
                if bigger:
                    vals = list(getattr(s, f))
                    vals[i] = bigger[0]
                    assert flops.count_flops(s.replace(**{f: tuple(vals)})) >= base


def test_slimmable_mobilenet_v2_matches_published_numbers():
    """MobileNetV2 1.0x / 0.35x at 224: 300 / 59 M multiply-adds, 3.4 M params (3,504,872 with BN, as
    torchvision's mobilenet_v2)."""
    space = ss.get_space("slimmable_mobilenet_v2")
    assert flops.count_flops(space.max_subnet(), space) == pytest.approx(300.774272, abs=1e-6)
    assert flops.count_params(space.max_subnet(), space) == 3_504_872
    assert flops.count_flops(space.min_subnet(), space) == pytest.approx(59.285808, abs=1e-6)
    per = dict(flops.layer_flops(space.max_subnet(), space))
    assert per["stem"] == 3 * 32 * 112 * 112 * 9 and per["head.final_expand"] == 320 * 1280 * 7 * 7
    assert per["classifier"] == 1280 * 1000 and "block0.expand" not in per


def test_flops_module_does_not_import_jax():
    import subprocess
    code = "import sys, alphanet_jax.flops, alphanet_jax.search_space; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
