"""The masked supernet computes what the sliced (reference-style) subnet computes."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import errors, export, flops, layers, presets, sampling, search_space as ss, spaces, supernet
from alphanet_jax import supernet_init
from alphanet_jax.resolve import resolve
from alphanet_jax.subnet_encoding import encode

TINY = ss.get_space("tiny")
ALPHA = ss.get_space("alphanet")


def _lively(variables, space, seed=0):
    """Non-trivial variables: unit project-BN gamma (init has 0), random BN affine, sane running stats."""
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (x + 0.5 + 0.2 * jax.random.uniform(jax.random.PRNGKey(hash(str(p)) % 2**31), x.shape))
        if "project_bn" in str(p) and "scale" in str(p) else x, variables["params"])
    model = supernet.Supernet(space=space)
    x = jax.random.normal(jax.random.PRNGKey(seed), (8, 16, 16, 3))
    _, st = jax.jit(lambda v, x: model.apply(v, x, encode(space.max_subnet(), space), train=True,
                                             mutable=["batch_stats"]))({**variables, "params": params}, x)
    return {"params": params, "batch_stats": st["batch_stats"]}


@pytest.fixture(scope="module")
def tiny_vars():
    return _lively(supernet.init_variables(TINY, seed=1), TINY)


@pytest.fixture(scope="module")
def alpha_vars():
    return _lively(supernet.init_variables(ALPHA, seed=2), ALPHA)


def _compare(space, variables, subnets, train, x, rtol, dtype=jnp.float32):
    model = supernet.Supernet(space=space, dtype=dtype)
    traces = []

    def fn(v, x, enc):
        traces.append(enc.resolution)
        return model.apply(v, x, enc, train=train)

    f = jax.jit(fn)
    worst = 0.0
    for s in subnets:
        a = f(variables, x, encode(s, space))
        m, sv = export.extract_subnet(variables, s, space, dtype=dtype)
        b = jax.jit(lambda v, x, m=m: m.apply(v, x, train=train))(sv, x)
        err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6))
        worst = max(worst, err)
        assert err < rtol, (s, err)
        assert export.num_params(sv) == flops.count_params(s, space)
    # one compiled program per resolution, whatever the subnets
    assert sorted(traces) == sorted({s.resolution for s in subnets})
    return worst


@pytest.mark.parametrize("train", [False, True])
def test_masked_equals_static_tiny(tiny_vars, train):
    rng = random.Random(7)
    subnets = [TINY.max_subnet(), TINY.min_subnet()] + [sampling.sample_subnet(TINY, rng) for _ in range(20)]
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
    _compare(TINY, tiny_vars, subnets, train, x, rtol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_masked_equals_static_tiny_bfloat16(tiny_vars, train):
    """bfloat16 compute (emulated by XLA on CPU): the masked supernet and the static subnet round
    differently (masked full-width tensors vs sliced ones, fused differently), about 1e-2 relative."""
    rng = random.Random(8)
    subnets = [TINY.max_subnet(), TINY.min_subnet()] + [sampling.sample_subnet(TINY, rng) for _ in range(4)]
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
    worst = _compare(TINY, tiny_vars, subnets, train, x, rtol=3e-2, dtype=jnp.bfloat16)
    print(f"largest relative masked-vs-static difference (bf16, train={train}): {worst:.2e}")


def test_bfloat16_logits_come_from_a_float32_classifier(tiny_vars):
    """In bfloat16 the convolutions run in bf16, the classifier (inputs upcast), its bias and the logits
    in float32: the logits are not bf16 numbers, and equal the float32 classifier on the bf16 features."""
    s = sampling.sample_subnet(TINY, random.Random(1))
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 32, 32, 3))
    enc = encode(s, TINY)
    z16 = jax.jit(supernet.Supernet(space=TINY, dtype=jnp.bfloat16).apply)(tiny_vars, x, enc)
    z32 = jax.jit(supernet.Supernet(space=TINY).apply)(tiny_vars, x, enc)
    assert z16.dtype == jnp.float32
    z16 = np.asarray(z16)
    assert np.mean(z16 != z16.astype(jnp.bfloat16).astype(np.float32)) > 0.5  # not rounded to bf16
    assert float(np.max(np.abs(z16 - np.asarray(z32))) / np.max(np.abs(np.asarray(z32)))) < 3e-2
    m, sv = export.extract_subnet(tiny_vars, s, TINY, dtype=jnp.bfloat16)
    zs = np.asarray(jax.jit(m.apply)(sv, x))
    assert zs.dtype == np.float32 and np.mean(zs != zs.astype(jnp.bfloat16).astype(np.float32)) > 0.5


@pytest.mark.slow
def test_masked_equals_static_alphanet_eval(alpha_vars):
    rng = random.Random(11)
    # The presets at their own resolutions; random subnets at the smallest (one program for all of them).
    subnets = [presets.preset("a0"), presets.preset("a6")] + [
        sampling.sample_subnet(ALPHA, rng).replace(resolution=min(ALPHA.resolutions)) for _ in range(8)]
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 3))
    worst = _compare(ALPHA, alpha_vars, subnets, False, x, rtol=1e-4)
    print(f"largest relative masked-vs-static difference (eval): {worst:.2e}")


@pytest.mark.slow
def test_masked_equals_static_alphanet_train(alpha_vars):
    rng = random.Random(12)
    subnets = [sampling.sample_subnet(ALPHA, rng).replace(resolution=192) for _ in range(5)] + [presets.preset("a0")]
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 3))
    worst = _compare(ALPHA, alpha_vars, subnets, True, x, rtol=1e-4)
    print(f"largest relative masked-vs-static difference (train): {worst:.2e}")


def test_one_program_per_resolution_over_many_subnets(tiny_vars):
    model = supernet.Supernet(space=TINY)
    traces = []

    @jax.jit
    def f(v, x, enc):
        traces.append(1)
        return model.apply(v, x, enc, train=True)

    rng = random.Random(0)
    x = jnp.ones((2, 32, 32, 3))
    seen = set()
    while len(seen) < 12:
        s = sampling.sample_subnet(TINY, rng).replace(resolution=24)
        seen.add(s)
        f(tiny_vars, x, encode(s, TINY))
    assert len(traces) == 1 and f._cache_size() == 1


def test_inactive_weights_get_exactly_zero_gradient(tiny_vars):
    model = supernet.Supernet(space=TINY)
    s = TINY.min_subnet()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, TINY.num_classes))
    g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**tiny_vars, "params": p}, x, s, train=True) * w)))(
        tiny_vars["params"])
    rs = resolve(s, TINY)
    active = {b.index: b for b in rs.blocks}
    for b in TINY.blocks:
        gb = g[f"block{b.index}"]
        if b.index not in active:
            assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(gb)), b.index
            continue
        a = active[b.index]
        assert float(jnp.abs(gb["dw"]["kernel"][..., a.mid:]).max(initial=0)) == 0
        o = (b.max_kernel - a.kernel) // 2
        ring = np.ones((b.max_kernel, b.max_kernel), bool)
        ring[o:o + a.kernel, o:o + a.kernel] = False
        assert float(jnp.abs(gb["dw"]["kernel"][ring]).max(initial=0)) == 0
        assert float(jnp.abs(gb["project"]["kernel"][a.mid:]).max(initial=0)) == 0
        assert float(jnp.abs(gb["project"]["kernel"][:, a.out_ch:]).max(initial=0)) == 0
        if a.se_mid:
            assert float(jnp.abs(gb["se_reduce"]["kernel"][:, a.se_mid:]).max(initial=0)) == 0
            assert float(jnp.abs(gb["se_reduce"]["bias"][a.se_mid:]).max(initial=0)) == 0
        if a.shortcut in ("identity", "pool"):
            assert float(jnp.abs(gb["shortcut"]["kernel"]).max()) == 0
        assert float(jnp.abs(gb["dw"]["kernel"][o:o + a.kernel, o:o + a.kernel, :, :a.mid]).max()) > 0
    assert float(jnp.abs(g["classifier"]["kernel"][rs.head_width:]).max(initial=0)) == 0
    assert float(jnp.abs(g["stem"]["kernel"][..., rs.stem_width:]).max(initial=0)) == 0


@pytest.mark.parametrize("train", [False, True])
def test_inactive_channels_stay_zero(tiny_vars, train):
    rng = random.Random(5)
    for _ in range(10):
        s = sampling.sample_subnet(TINY, rng)
        enc = encode(s, TINY)
        rs = resolve(s, TINY)
        for a in rs.blocks:
            b = TINY.blocks[a.index]
            x = jax.random.normal(jax.random.PRNGKey(a.index), (2, 8, 8, b.max_in))
            x = x * (jnp.arange(b.max_in) < a.in_ch)
            e = {k: getattr(enc, k)[a.index] for k in ("in_ch", "mid", "out_ch", "kernel", "se")}
            p = tiny_vars["params"][f"block{a.index}"]
            st = tiny_vars["batch_stats"][f"block{a.index}"]
            y, _ = supernet._block_forward(p, st, x, e, b, train=train, eps=1e-5, axis_name=None,
                                           dc_rate=0.0, dc_static=False, rng=None)
            assert y.shape[-1] == b.max_out
            assert float(jnp.abs(y[..., a.out_ch:]).max(initial=0)) == 0.0
            assert float(jnp.abs(y[..., :a.out_ch]).max()) > 0


def test_bicubic_resize_matches_pytorch_known_values():
    # torch.nn.functional.interpolate(x, size=7, mode='bicubic', align_corners=False), x = arange(20)^1.5 [4,5]
    x = (np.arange(20.0) ** 1.5).reshape(1, 4, 5, 1).astype(np.float32)
    y = np.asarray(layers.resize_bicubic(jnp.asarray(x), 7))[0, :, :, 0]
    assert y.shape == (7, 7)
    np.testing.assert_allclose(y[0], [-1.168337, -0.845092, 0.057278, 1.27154, 2.669278, 4.808862, 6.323353],
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y[:, 0], [-1.168337, 2.412738, 9.335774, 19.627419, 33.689526, 49.88845,
                                         60.24821], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y[6, 6], 86.354034, rtol=1e-6)
    # downsampling 6x6 -> 4x4, no antialiasing
    z = (np.arange(36.0) ** 1.5).reshape(1, 6, 6, 1).astype(np.float32)
    w = np.asarray(layers.resize_bicubic(jnp.asarray(z), 4))[0, :, :, 0]
    np.testing.assert_allclose(w[0], [2.664051, 5.511147, 9.930308, 15.045873], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(w[3], [156.72572, 169.0884, 182.4693, 195.48264], rtol=1e-5)


def test_bicubic_resize_matches_live_pytorch():
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).randn(2, 3, 11, 11).astype(np.float32)
    for size in (5, 11, 16, 23):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bicubic",
                                              align_corners=False).numpy()
        got = np.asarray(layers.resize_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), size)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_initialisation_follows_reference():
    v = supernet.init_variables(TINY, seed=0)
    p = v["params"]
    for b in TINY.blocks:
        bp = p[f"block{b.index}"]
        assert float(jnp.abs(bp["project_bn"]["scale"]).max()) == 0.0  # zero gamma, every block
        assert float(jnp.abs(bp["dw"]["kernel"]).max()) <= 1 / b.max_kernel
        assert float(jnp.abs(bp["dw"]["kernel"]).max()) > 0.8 / b.max_kernel
        assert float(jnp.min(bp["dw_bn"]["scale"])) == 1.0
    bound = 1 / np.sqrt(max(TINY.head_widths))
    assert float(jnp.abs(p["classifier"]["bias"]).max()) <= bound
    assert float(jnp.min(v["batch_stats"]["stem_bn"]["var"])) == 1.0


def test_dropout_and_drop_connect_only_when_asked(tiny_vars):
    model = supernet.Supernet(space=TINY)
    s = TINY.max_subnet()
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 32, 32, 3))
    plain = model.apply(tiny_vars, x, s, train=True)
    zero = model.apply(tiny_vars, x, s, train=True, dropout_rate=0.0, drop_connect_rate=0.0,
                       rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_allclose(plain, zero, rtol=1e-6, atol=1e-6)
    dropped = model.apply(tiny_vars, x, s, train=True, dropout_rate=0.5, drop_connect_rate=0.5,
                          rngs={"dropout": jax.random.PRNGKey(1)})
    assert float(jnp.abs(dropped - plain).max()) > 1e-3
    # eval mode never drops
    e1 = model.apply(tiny_vars, x, s, train=False, dropout_rate=0.5, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_allclose(e1, model.apply(tiny_vars, x, s), rtol=1e-6)


def test_drop_connect_rates_follow_global_index():
    rates = supernet.drop_connect_rates(ALPHA)
    assert rates[:27] == [0.0] * 27
    assert rates[27] == pytest.approx(27 / 37) and rates[36] == pytest.approx(36 / 37)
    assert 0.2 * rates[27] == pytest.approx(0.146, abs=1e-3) and 0.2 * rates[36] == pytest.approx(0.195, abs=1e-3)


def test_exported_subnet_save_load_round_trip(tmp_path, tiny_vars):
    s = sampling.sample_subnet(TINY, random.Random(9))
    m, sv = export.extract_subnet(tiny_vars, s, TINY)
    export.save_subnet(str(tmp_path / "net"), m, sv)
    m2, sv2 = export.load_subnet_model(str(tmp_path / "net"))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(m.apply(sv, x)), np.asarray(m2.apply(sv2, x)))
    cfg_path = tmp_path / "net" / "config.json"
    meta = json.loads(cfg_path.read_text())
    other = TINY.max_subnet() if s != TINY.max_subnet() else TINY.min_subnet()
    cfg_path.write_text(json.dumps(dict(meta, subnet=other.to_dict())))
    with pytest.raises(ValueError, match="do not fit the subnet"):
        export.load_subnet_model(str(tmp_path / "net"))
    cfg_path.write_text(json.dumps(dict(meta, subnet=dict(meta["subnet"], resolution=999))))
    with pytest.raises(errors.SearchSpaceError, match="resolution 999"):
        export.load_subnet_model(str(tmp_path / "net"))
    with pytest.raises(FileNotFoundError, match="not an exported subnet"):
        export.load_subnet_model(str(tmp_path / "nothing"))


def test_exported_subnet_keeps_the_supernets_bn_epsilon(tmp_path, tiny_vars):
    """A supernet trained with another config.model.bn_eps exports (and reloads) a model with that epsilon:
    its logits are the masked supernet's with the same epsilon, not those of the default 1e-5."""
    s = sampling.sample_subnet(TINY, random.Random(4))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
    m, sv = export.extract_subnet(tiny_vars, s, TINY, bn_eps=1e-2)
    export.save_subnet(str(tmp_path / "net"), m, sv)
    m2, sv2 = export.load_subnet_model(str(tmp_path / "net"))
    assert m2.bn_eps == 1e-2
    got = np.asarray(m2.apply(sv2, x))

    def masked(eps):
        return np.asarray(supernet.Supernet(space=TINY, bn_eps=eps).apply(tiny_vars, x, s))

    scale = np.max(np.abs(got))
    assert np.max(np.abs(got - masked(1e-2))) <= 1e-5 * scale  # float32 reorderings of ~10 layers
    assert np.max(np.abs(got - masked(1e-5))) > 1e-3 * scale  # the epsilon matters: the check has teeth
    cfg_path = tmp_path / "net" / "config.json"
    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "bn_eps"}))  # an older export
    assert export.load_subnet_model(str(tmp_path / "net"))[0].bn_eps == 1e-5
    cfg_path.write_text(json.dumps(dict(meta, bn_eps="tiny")))
    with pytest.raises(errors.UserError, match="bn_eps 'tiny'"):
        export.load_subnet_model(str(tmp_path / "net"))


def test_bad_inputs_give_clear_errors(tiny_vars):
    model = supernet.Supernet(space=TINY)
    with pytest.raises(ValueError, match="channels"):
        model.apply(tiny_vars, jnp.ones((1, 32, 32, 1)), TINY.min_subnet())
    with pytest.raises(errors.SearchSpaceError, match="resolution"):
        model.apply(tiny_vars, jnp.ones((1, 32, 32, 3)), TINY.min_subnet().replace(resolution=40))


def test_mobilenet_v2_style_blocks_have_no_shortcut_params_and_unit_gamma():
    """'identity_when_same' spaces: no shortcut convs, project-BN gamma starts at one (most blocks have
    no residual, zero gamma would silence them), 'v2' head without feature mix."""
    space = ss.get_space("tiny_slimmable")
    shapes = jax.eval_shape(lambda: supernet.init_variables(space, seed=0))
    p = shapes["params"]
    assert all("shortcut" not in p[f"block{b.index}"] for b in space.blocks)
    assert set(p["head"]) == {"expand", "expand_bn"}
    assert p["head"]["expand"]["kernel"].shape == (space.blocks[-1].max_out, max(space.head_widths))
    assert p["classifier"]["kernel"].shape == (max(space.head_widths), space.num_classes)
    b = space.blocks[0]
    assert float(np.min(supernet_init.init_block(jax.random.PRNGKey(0), b)["project_bn"]["scale"])) == 1.0
    assert all("shortcut" in supernet_init.init_block(jax.random.PRNGKey(0), b) for b in TINY.blocks[:1])


def _train_grads(model, variables, x, w):
    """jit (params, enc) -> (grads, (logits, BN stats)) of sum(logits * w) in train mode, dropout and
    drop-connect on: what the option-equivalence tests compare."""
    @jax.jit
    def f(params, enc):
        def loss(p):
            z, st = model.apply({**variables, "params": p}, x, enc, train=True, dropout_rate=0.3,
                                drop_connect_rate=0.5, rngs={"dropout": jax.random.PRNGKey(2)},
                                mutable=["batch_stats"])
            return jnp.sum(z * w), (z, st)
        return jax.grad(loss, has_aux=True)(params)
    return f


@pytest.mark.parametrize("skip_inactive,remat,residuals", [(False, True, "all"), (True, True, "all"),
                                                             (True, False, "convs")])
def test_remat_gives_the_same_logits_stats_and_gradients(tiny_vars, skip_inactive, remat, residuals):
    """`remat` (recompute blocks in the backward pass), `block_residuals='convs'` (keep only the
    convolutions' outputs, SE gates and BN statistics; recompute the rest) and `skip_inactive` change
    memory and speed, never the result: train-mode logits, BN statistics and gradients, with dropout
    and drop-connect, equal those of the network that keeps every intermediate. Tolerance: the same
    float32 arithmetic, recomputed and fused differently, on the scale of each tensor."""
    base = supernet.Supernet(space=TINY, skip_inactive=False, block_residuals="all")
    other = supernet.Supernet(space=TINY, skip_inactive=skip_inactive, remat=remat, block_residuals=residuals)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 24, 24, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, TINY.num_classes))

    fa, fb = _train_grads(base, tiny_vars, x, w), _train_grads(other, tiny_vars, x, w)
    rng = random.Random(5)
    for s in [TINY.max_subnet(), TINY.min_subnet()] + [sampling.sample_subnet(TINY, rng) for _ in range(4)]:
        enc = encode(s, TINY)
        (ga, (za, sa)), (gb, (zb, sb)) = fa(tiny_vars["params"], enc), fb(tiny_vars["params"], enc)
        np.testing.assert_allclose(zb, za, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves((ga, sa)), jax.tree.leaves((gb, sb))):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))


# A tiny space with deep stages, so that `scan_blocks` has groups of several blocks to scan (and
# groups that mix always-run and depth-optional positions).
DEEP = ss.get_space(dict(spaces.TINY_SPACE, name="tiny_deep", stages=[
    dict(st, depths=[1, 2, 3, 4]) if i != 1 else dict(st, depths=[2, 4]) for i, st in enumerate(spaces.TINY_SPACE["stages"])]))


def test_block_groups_scan_each_stages_same_shape_blocks():
    groups = supernet.block_groups(DEEP)
    # Stage 1 (depths 2, 4): block 5 runs in every subnet, 6 and 7 are depth-optional.
    assert [[b.index for b in g] for g in groups] == [[0], [1, 2, 3], [4], [5], [6, 7], [8], [9, 10, 11]]
    # For depth skipping (`layers.prefix_scan`) a stage's blocks after the first stay one group.
    merged = supernet.block_groups(DEEP, by_depth=False)
    assert [[b.index for b in g] for g in merged] == [[0], [1, 2, 3], [4], [5, 6, 7], [8], [9, 10, 11]]
    for g in groups + merged:
        assert len({(b.stride, b.max_in, b.max_out, b.max_mid, b.max_kernel, b.se) for b in g}) == 1
    assert supernet.resolve_scan_blocks("auto") is (jax.default_backend() == "cpu")
    assert supernet.resolve_scan_blocks("False") is False and supernet.resolve_scan_blocks(True) is True
    with pytest.raises(ValueError, match="scan_blocks"):
        supernet.resolve_scan_blocks("sometimes")
    assert supernet.resolve_skip_inactive("auto", True) is (jax.default_backend() == "cpu")
    assert supernet.resolve_skip_inactive("auto", False) is False
    assert supernet.resolve_skip_inactive("true", False) is True and supernet.resolve_skip_inactive(False, True) is False
    with pytest.raises(ValueError, match="skip_inactive_blocks"):
        supernet.resolve_skip_inactive("sometimes", True)
    assert supernet.resolve_block_residuals("auto") == ("convs" if jax.default_backend() == "cpu" else "all")
    assert supernet.resolve_block_residuals("All") == "all"
    with pytest.raises(ValueError, match="block_residuals"):
        supernet.resolve_block_residuals("some")


@pytest.mark.parametrize("skip_inactive,remat", [(False, False)])
def test_scanned_blocks_give_the_same_logits_stats_and_gradients(skip_inactive, remat):
    """`scan_blocks` only changes the program's shape: train-mode logits, BN statistics and gradients
    (dropout and drop-connect on) equal the unrolled network's. Tolerance: the same float32
    arithmetic fused differently, on the scale of each tensor."""
    variables = _lively(supernet.init_variables(DEEP, seed=3), DEEP)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 24, 24, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, DEEP.num_classes))

    unrolled, scanned = (_train_grads(supernet.Supernet(space=DEEP, skip_inactive=skip_inactive, remat=remat,
                                                        scan_blocks=scan), variables, x, w) for scan in (False, True))
    rng = random.Random(7)
    for s in [DEEP.max_subnet(), DEEP.min_subnet()] + [sampling.sample_subnet(DEEP, rng) for _ in range(2)]:
        enc = encode(s, DEEP)
        (ga, (za, sa)), (gb, (zb, sb)) = unrolled(variables["params"], enc), scanned(variables["params"], enc)
        np.testing.assert_allclose(zb, za, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(za).max())))
        assert jax.tree.structure((ga, sa)) == jax.tree.structure((gb, sb))
        for a, b in zip(jax.tree.leaves((ga, sa)), jax.tree.leaves((gb, sb))):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_hidden_tensors_are_as_wide_as_resolve_makes_them_in_a_custom_space():
    """Widths [12, 20] into an expand ratio of 5: the hidden width is make_divisible(100, 8) = 104, so the
    supernet's tensor must be 104 wide (it was round(20 x 5) = 100, silently truncating the active width
    while FLOPs counted 104); the masked supernet still equals the static subnet."""
    d = json.loads(json.dumps(spaces.TINY_SPACE))
    d["name"] = "odd_widths"
    d["stages"][0]["widths"] = [12, 20]
    d["stages"][1]["expand_ratios"] = [5]
    space = ss.SearchSpace.from_config(d)
    block = space.blocks[space.stage_blocks(1)[0]]
    assert (block.max_in, block.max_mid) == (20, 104)
    for s in (space.max_subnet(), space.min_subnet()):
        for b in resolve(s, space).blocks:
            assert b.mid <= space.blocks[b.index].max_mid and b.se_mid <= space.blocks[b.index].max_se
    variables = _lively(supernet.init_variables(space, seed=3), space)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 24, 24, 3))
    _compare(space, variables, [space.max_subnet(), space.min_subnet()], False, x, rtol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_depth_skipping_loop_gives_the_same_logits_and_gradients(remat):
    """With scanned blocks, `skip_inactive` runs a stage's depth-optional blocks as a loop over the
    active ones only (`layers.prefix_scan`, its own backward): train-mode logits and gradients (dropout
    and drop-connect on) and eval-mode logits equal those of the network that computes every block and
    discards the inactive ones, for subnets of every depth. Tolerance as the scanned-blocks test."""
    variables = _lively(supernet.init_variables(DEEP, seed=3), DEEP)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 24, 24, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, DEEP.num_classes))
    models = [supernet.Supernet(space=DEEP, skip_inactive=skip, remat=remat and skip, scan_blocks=True)
              for skip in (False, True)]

    def grads(model):
        @jax.jit
        def f(params, enc):
            def loss(p):
                z = model.apply({**variables, "params": p}, x, enc, train=True, dropout_rate=0.3,
                                drop_connect_rate=0.5, rngs={"dropout": jax.random.PRNGKey(2)})
                return jnp.sum(z * w), z
            return jax.grad(loss, has_aux=True)(params)
        return f

    evals = [jax.jit(lambda v, enc, m=m: m.apply(v, x, enc)) for m in models]
    full, looped = (grads(m) for m in models)
    rng = random.Random(11)
    subnets = [DEEP.max_subnet(), DEEP.min_subnet()] + [sampling.sample_subnet(DEEP, rng) for _ in range(3)]
    assert len({tuple(s.depth) for s in subnets}) >= 4
    for s in subnets:
        enc = encode(s, DEEP)
        (ga, za), (gb, zb) = full(variables["params"], enc), looped(variables["params"], enc)
        np.testing.assert_allclose(zb, za, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(za).max())))
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))
        ea, eb = (np.asarray(e(variables, enc)) for e in evals)
        np.testing.assert_allclose(eb, ea, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ea).max())))
