"""Checkpoint conversion: official PyTorch supernet state dicts <-> Flax variables (spec §10)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import pytest

from alphanet_jax import convert, depthwise as depthwise_lib, layers, supernet
from alphanet_jax.convert import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError
from alphanet_jax.resolve import resolve
from alphanet_jax.sampling import sample_subnet
from alphanet_jax.search_space import get_space
from alphanet_jax.subnet_encoding import encode

TINY = get_space("tiny")
ALPHANET = get_space("alphanet")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def random_variables(space, seed=0):
    """Random variables with the exact tree of `supernet.init_variables(space)` (no XLA compile).

    Weights ~ N(0, 1/fan_in), BN scale around 1, positive running variances, so every mapping error
    shows up in the logits.
    """
    shapes = jax.eval_shape(lambda: supernet.init_variables(space))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if "'scale'" in name:
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if "'kernel'" in name:
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).shape == np.asarray(y).shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


CONFIG_MODULE_SRC = '''
class AttrDict(dict):
    """Like AttentiveNAS utils.config.AttrDict: the dict is its own __dict__."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__ = self
        for k, v in list(self.items()):
            if isinstance(v, dict):
                self[k] = AttrDict(v)

    def __setstate__(self, state):
        open(SENTINEL, "w").close()  # must never run while loading a checkpoint
        self.__dict__ = self


class Config(AttrDict):
    pass
'''


def make_config_object(sentinel):
    """An instance of a custom class from a throwaway module, which is then removed from sys.modules."""
    name = "_alphanet_test_throwaway_config"
    mod = types.ModuleType(name)
    mod.SENTINEL = str(sentinel)
    exec(CONFIG_MODULE_SRC, mod.__dict__)
    sys.modules[name] = mod
    cfg = mod.Config({"arch": "attentive_nas_dynamic_model", "bn_eps": "1e-5", "epochs": 360,
                      "lr_scheduler": {"method": "warmup_cosine_lr", "warmup_epochs": 5},
                      "resolutions": [192, 224, 256, 288], "flags": {1, 2}, "blob": b"\x00\x01",
                      "np_value": np.float64(0.5)})
    return cfg, (lambda: sys.modules.pop(name, None))


def official_checkpoint(variables, space, path, *, zip_format, prefix="module.", sentinel=None, extra=None):
    """Writes a file shaped like AttentiveNAS `save_checkpoint` (spec §10.1) and returns its state dict."""
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in convert.to_pytorch_state_dict(variables, space, prefix).items()}
    if extra:
        sd.update(extra)
    cfg, remove = make_config_object(sentinel or (os.path.dirname(str(path)) + "/sentinel"))
    first = next(iter(sd.values()))
    ckpt = {
        "epoch": 360,
        "args": cfg,
        "state_dict": sd,
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros_like(first)}},
                      "param_groups": [{"lr": 0.8, "momentum": 0.9, "weight_decay": 1e-5, "params": [0]},
                                       {"lr": 0.8, "momentum": 0.9, "weight_decay": 0.0, "params": [1]}]},
        "lr_scheduler": {"last_epoch": 225000, "base_lrs": [0.8, 0.8], "warmup_iters": 3125},
    }
    try:
        with open(path, "wb") as f:
            torch.save(ckpt, f, _use_new_zipfile_serialization=zip_format)
    finally:
        remove()
    return sd


@pytest.fixture(scope="module")
def tiny_vars():
    return random_variables(TINY, seed=1)


@pytest.fixture(scope="module")
def alphanet_vars():
    return random_variables(ALPHANET, seed=2)


@pytest.fixture(scope="module")
def tiny_apply():
    model = supernet.Supernet(space=TINY)
    fn = jax.jit(lambda v, x, enc: model.apply(v, x, enc))
    return lambda v, x, cfg: np.asarray(fn(v, x, encode(cfg, TINY)))


# ----------------------------------------------------------------------------
# names, shapes, counts (spec §10.2, §1.2)
# ----------------------------------------------------------------------------


def test_alphanet_official_names_shapes_and_counts(alphanet_vars):
    shapes = convert.pytorch_state_dict_shapes(ALPHANET)
    assert len(shapes) == 1468
    specs = convert.tensor_specs(ALPHANET)
    trainable = [e for e in specs if e.trainable]
    assert len(trainable) == 469
    assert sum(int(np.prod(e.torch_shape)) for e in trainable) == 23_934_704
    expect = {
        "module.first_conv.conv.conv.weight": (24, 3, 3, 3),
        "module.first_conv.bn.bn.weight": (24,),
        "module.first_conv.bn.bn.num_batches_tracked": (),
        "module.first_conv.bn.bn_tracking.1.running_var": (24,),
        "module.blocks.0.mobile_inverted_conv.depth_conv.conv.conv.weight": (24, 1, 5, 5),
        "module.blocks.0.shortcut.conv.conv.weight": (24, 24, 1, 1),
        "module.blocks.2.mobile_inverted_conv.inverted_bottleneck.conv.conv.weight": (144, 24, 1, 1),
        "module.blocks.2.mobile_inverted_conv.point_linear.conv.conv.weight": (32, 144, 1, 1),
        "module.blocks.7.mobile_inverted_conv.depth_conv.se.fc.reduce.weight": (48, 192, 1, 1),
        "module.blocks.7.mobile_inverted_conv.depth_conv.se.fc.reduce.bias": (48,),
        "module.blocks.7.mobile_inverted_conv.depth_conv.se.fc.expand.weight": (192, 48, 1, 1),
        "module.blocks.19.shortcut.conv.conv.weight": (128, 72, 1, 1),
        "module.blocks.27.mobile_inverted_conv.point_linear.bn.bn.running_mean": (216,),
        "module.blocks.28.mobile_inverted_conv.depth_conv.se.fc.reduce.weight": (328, 1296, 1, 1),
        "module.blocks.36.mobile_inverted_conv.depth_conv.se.fc.expand.bias": (1344,),
        "module.blocks.36.mobile_inverted_conv.point_linear.conv.conv.weight": (224, 1344, 1, 1),
        "module.last_conv.final_expand_layer.conv.conv.weight": (1344, 224, 1, 1),
        "module.last_conv.final_expand_layer.bn.bn.running_var": (1344,),
        "module.last_conv.feature_mix_layer.conv.conv.weight": (1984, 1344, 1, 1),
        "module.classifier.linear.linear.weight": (1000, 1984),
        "module.classifier.linear.linear.bias": (1000,),
    }
    for k, s in expect.items():
        assert shapes[k] == s, k
    # mb1 has no expansion conv; SE exactly on mb3 and mb5..mb7 (blocks 7-12, 19-36); no feature-mix BN.
    assert not any(k.startswith(("module.blocks.0.mobile_inverted_conv.inverted_bottleneck",
                                 "module.blocks.1.mobile_inverted_conv.inverted_bottleneck")) for k in shapes)
    se_blocks = sorted({int(k.split(".")[2]) for k in shapes if ".se.fc." in k})
    assert se_blocks == list(range(7, 13)) + list(range(19, 37))
    assert not any(k.startswith("module.last_conv.feature_mix_layer.bn") for k in shapes)
    # The reverse mapping emits exactly these names and shapes, in this order.
    sd = convert.to_pytorch_state_dict(alphanet_vars, ALPHANET)
    assert list(sd) == list(shapes)
    assert {k: v.shape for k, v in sd.items()} == shapes
    assert sd["module.first_conv.bn.bn.num_batches_tracked"].dtype == np.int64


def test_alphanet_tree_matches_supernet_and_round_trips(alphanet_vars):
    ref = jax.eval_shape(lambda: supernet.init_variables(ALPHANET))
    sd = convert.to_pytorch_state_dict(alphanet_vars, ALPHANET, prefix="")
    back = convert.state_dict_to_variables(sd, ALPHANET)
    assert jax.tree.structure(back) == jax.tree.structure(ref)
    assert jax.tree.map(lambda a: a.shape, back) == jax.tree.map(lambda a: a.shape, ref)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(back))
    assert_trees_equal(back, alphanet_vars)


def test_alphanet_legacy_file_round_trip(alphanet_vars, tmp_path):
    path = tmp_path / "alphanet_pretrained.pth.tar"
    official_checkpoint(alphanet_vars, ALPHANET, path, zip_format=False)
    assert_trees_equal(convert.load_pytorch_checkpoint(path), alphanet_vars)


def test_spec_shapes_follow_the_space():
    # No stage list in the converter: a custom space gets its own table.
    cfg = ALPHANET.to_dict()
    cfg["stages"] = cfg["stages"][:3]
    cfg["stages"][2]["depths"] = [1, 2]
    space = get_space(cfg)
    shapes = convert.pytorch_state_dict_shapes(space, prefix="")
    n_blocks = 2 + 5 + 2
    assert {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")} == set(range(n_blocks))
    assert shapes["last_conv.final_expand_layer.conv.conv.weight"] == (240, 40, 1, 1)


# ----------------------------------------------------------------------------
# synthetic official checkpoints: both serializations, with and without `module.`
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
@pytest.mark.parametrize("prefix", ["module.", ""], ids=["ddp", "noprefix"])
def test_official_checkpoint_round_trip(tiny_vars, tmp_path, zip_format, prefix):
    torch = pytest.importorskip("torch")
    path = tmp_path / "ckpt.pth.tar"
    sentinel = tmp_path / "setstate_ran"
    official_checkpoint(tiny_vars, TINY, path, zip_format=zip_format, prefix=prefix, sentinel=sentinel)
    with open(path, "rb") as f:
        assert (f.read(2) == b"PK") == zip_format
    variables = convert.load_pytorch_checkpoint(path, "tiny")
    assert_trees_equal(variables, tiny_vars)
    assert not sentinel.exists()
    # The whole file reads; the config object is an inert placeholder holding its data.
    obj = convert.safe_torch_load(path)
    assert obj["epoch"] == 360 and obj["lr_scheduler"]["last_epoch"] == 225000
    assert isinstance(obj["optimizer"]["state"][0]["momentum_buffer"], torch.Tensor)
    args = obj["args"]
    assert isinstance(args, convert.CheckpointPlaceholder)
    assert (args.module, args.name) == ("_alphanet_test_throwaway_config", "Config")
    d = args.to_dict()
    assert d["epochs"] == 360 and d["resolutions"] == [192, 224, 256, 288]
    assert d["lr_scheduler"]["warmup_epochs"] == 5 and d["flags"] == {1, 2} and d["blob"] == b"\x00\x01"
    assert not sentinel.exists()


def test_custom_class_code_never_runs_even_when_importable(tiny_vars, tmp_path):
    # Save with the class importable and keep it importable: the loader must still not use it.
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.pth.tar"
    sentinel = tmp_path / "setstate_ran"
    cfg, remove = make_config_object(sentinel)
    try:
        import torch
        torch.save({"args": cfg, "state_dict": {k: torch.from_numpy(v) for k, v in
                                                convert.to_pytorch_state_dict(tiny_vars, TINY).items()}},
                   path, _use_new_zipfile_serialization=False)
        pickle.loads(pickle.dumps(cfg))  # the class's __setstate__ does run under plain pickle
        assert sentinel.exists()
        sentinel.unlink()
        convert.load_pytorch_checkpoint(path, TINY)
        assert isinstance(convert.safe_torch_load(path)["args"], convert.CheckpointPlaceholder)
        assert not sentinel.exists()
    finally:
        remove()


@pytest.mark.parametrize("key", ["model", "state_dict_ema"])
def test_other_state_dict_entries_with_a_note(tiny_vars, tmp_path, key):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in convert.to_pytorch_state_dict(tiny_vars, TINY, prefix="").items()}
    path = tmp_path / "ckpt.pt"
    torch.save({key: sd, "epoch": 3}, path)
    with pytest.warns(UserWarning, match=key):
        assert_trees_equal(convert.load_pytorch_checkpoint(path, TINY), tiny_vars)


def test_bare_state_dict_and_explicit_key(tiny_vars, tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in convert.to_pytorch_state_dict(tiny_vars, TINY).items()}
    torch.save(sd, tmp_path / "bare.pt")
    assert_trees_equal(convert.load_pytorch_checkpoint(tmp_path / "bare.pt", TINY), tiny_vars)
    other = {k: v * 2 for k, v in sd.items() if v.is_floating_point()}
    torch.save({"state_dict": sd, "state_dict_ema": other}, tmp_path / "both.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_trees_equal(convert.load_pytorch_checkpoint(tmp_path / "both.pt", TINY), tiny_vars)
    ema = convert.load_pytorch_checkpoint(tmp_path / "both.pt", TINY, key="state_dict_ema")
    np.testing.assert_array_equal(ema["params"]["stem"]["kernel"], 2 * tiny_vars["params"]["stem"]["kernel"])
    # Parameters (torch._utils._rebuild_parameter) and half precision load too.
    torch.save({"state_dict": {k: torch.nn.Parameter(v.half()) if v.is_floating_point() else v
                               for k, v in sd.items()}}, tmp_path / "half.pt")
    half = convert.load_pytorch_checkpoint(tmp_path / "half.pt", TINY)
    assert half["params"]["stem"]["kernel"].dtype == np.float32
    np.testing.assert_allclose(half["params"]["stem"]["kernel"], tiny_vars["params"]["stem"]["kernel"], rtol=1e-3,
                               atol=1e-3)
    torch.save({"epoch": 1, "weights": [1, 2]}, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        convert.load_pytorch_checkpoint(tmp_path / "none.pt", TINY)


# ----------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------


def torch_reference_logits(sd, space, cfg, x_nchw):
    """The reference's static subnet (spec §2, §10.3 slicing) in PyTorch, read from an official state dict."""
    import torch.nn.functional as F

    rs = resolve(cfg, space)

    def g(k):
        return sd["module." + k]

    def bn(x, p, c):
        return F.batch_norm(x, g(p + ".bn.running_mean")[:c], g(p + ".bn.running_var")[:c],
                            g(p + ".bn.weight")[:c], g(p + ".bn.bias")[:c], training=False, eps=1e-5)

    act = F.silu
    c0 = rs.stem_width
    x = F.conv2d(x_nchw, g("first_conv.conv.conv.weight")[:c0], stride=space.stem_stride,
                 padding=space.stem_kernel // 2)
    x = act(bn(x, "first_conv.bn", c0))
    for b in rs.blocks:
        m = f"blocks.{b.index}.mobile_inverted_conv"
        h = x
        if b.has_expand:
            h = F.conv2d(h, g(m + ".inverted_bottleneck.conv.conv.weight")[:b.mid, :b.in_ch])
            h = act(bn(h, m + ".inverted_bottleneck.bn", b.mid))
        w = g(m + ".depth_conv.conv.conv.weight")[:b.mid]
        s = (w.shape[-1] - b.kernel) // 2
        w = w[:, :, s:s + b.kernel, s:s + b.kernel]
        h = F.conv2d(h, w, stride=b.stride, padding=b.kernel // 2, groups=b.mid)
        h = act(bn(h, m + ".depth_conv.bn", b.mid))
        if b.se_mid:
            se = m + ".depth_conv.se.fc"
            y = h.mean((2, 3), keepdim=True)
            y = F.relu(F.conv2d(y, g(se + ".reduce.weight")[:b.se_mid, :b.mid], g(se + ".reduce.bias")[:b.se_mid]))
            y = F.conv2d(y, g(se + ".expand.weight")[:b.mid, :b.se_mid], g(se + ".expand.bias")[:b.mid])
            h = h * (F.relu6(y + 3.0) / 6.0)
        h = F.conv2d(h, g(m + ".point_linear.conv.conv.weight")[:b.out_ch, :b.mid])
        h = bn(h, m + ".point_linear.bn", b.out_ch)
        sc = x
        if b.stride > 1:
            sc = F.avg_pool2d(sc, 2, 2, padding=0 if sc.shape[-1] % 2 == 0 else 1)
        if b.in_ch != b.out_ch:
            sc = F.conv2d(sc, g(f"blocks.{b.index}.shortcut.conv.conv.weight")[:b.out_ch, :b.in_ch])
        x = h + sc
    he, hw = rs.head_expand, rs.head_width
    x = F.conv2d(x, g("last_conv.final_expand_layer.conv.conv.weight")[:he, :x.shape[1]])
    x = act(bn(x, "last_conv.final_expand_layer.bn", he)).mean((2, 3), keepdim=True)
    x = act(F.conv2d(x, g("last_conv.feature_mix_layer.conv.conv.weight")[:hw, :he]))
    return F.linear(x.reshape(x.shape[0], -1), g("classifier.linear.linear.weight")[:, :hw],
                    g("classifier.linear.linear.bias"))


def _subnets():
    import random
    rng = random.Random(0)
    r = max(TINY.resolutions)
    return [TINY.max_subnet(), TINY.min_subnet().replace(resolution=r),
            sample_subnet(TINY, rng).replace(resolution=r), sample_subnet(TINY, rng).replace(resolution=r)]


def test_converted_weights_match_a_pytorch_reference_forward(tiny_vars, tiny_apply, tmp_path):
    """Official-format weights run through a PyTorch re-implementation of the static subnet give the
    same logits as the JAX supernet on the converted weights: every transpose is checked in context
    (square 1x1 convs included, which shape checks cannot catch)."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "ckpt.pth.tar"
    sd = official_checkpoint(tiny_vars, TINY, path, zip_format=False)
    variables = convert.load_pytorch_checkpoint(path, TINY)
    r = max(TINY.resolutions)
    x = np.random.default_rng(3).standard_normal((2, r, r, 3)).astype(np.float32)
    for cfg in _subnets():
        got = tiny_apply(variables, x, cfg)
        with torch.no_grad():
            want = torch_reference_logits(sd, TINY, cfg, torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=str(cfg))
        # Round trip: the original JAX variables give the same logits, exactly.
        np.testing.assert_array_equal(tiny_apply(tiny_vars, x, cfg), got)


@pytest.mark.parametrize("k,stride", [(3, 2), (5, 1), (5, 2)])
def test_conv_mappings_match_torch(k, stride):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(k * 10 + stride)
    x = rng.standard_normal((2, 6, 10, 10)).astype(np.float32)            # NCHW
    x_nhwc = x.transpose(0, 2, 3, 1)

    def close(jax_nhwc, torch_nchw):
        np.testing.assert_allclose(np.asarray(jax_nhwc), torch_nchw.numpy().transpose(0, 2, 3, 1),
                                   rtol=1e-5, atol=1e-5)

    # full conv (the stem): OIHW -> HWIO
    w = rng.standard_normal((8, 6, k, k)).astype(np.float32)
    hwio = convert.TensorSpec("w", "params", ("w",), "conv", w.shape).to_flax(w)
    assert hwio.shape == (k, k, 6, 8)
    close(layers.conv2d(x_nhwc, hwio, stride),
          F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=k // 2))
    # depthwise: [C,1,k,k] -> [k,k,1,C], feature_group_count = C
    w = rng.standard_normal((6, 1, k, k)).astype(np.float32)
    dw = convert.TensorSpec("w", "params", ("w",), "conv", w.shape).to_flax(w)
    assert dw.shape == (k, k, 1, 6)
    close(depthwise_lib.depthwise(x_nhwc, dw, stride),
          F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=k // 2, groups=6))
    # 1x1 conv: [O,I,1,1] -> [I,O]
    w = rng.standard_normal((6, 6, 1, 1)).astype(np.float32)
    pw = convert.TensorSpec("w", "params", ("w",), "pointwise", w.shape).to_flax(w)
    close(layers.pointwise(x_nhwc, pw), F.conv2d(torch.from_numpy(x), torch.from_numpy(w)))
    # linear: [O,I] -> [I,O]
    w = rng.standard_normal((5, 6)).astype(np.float32)
    lin = convert.TensorSpec("w", "params", ("w",), "linear", w.shape).to_flax(w)
    v = rng.standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(v @ lin, F.linear(torch.from_numpy(v), torch.from_numpy(w)).numpy(), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------
# malicious files
# ----------------------------------------------------------------------------


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _evil_cases(target):
    cmd = f"touch {target}"
    return {
        "os.system": _Evil(os.system, cmd),
        "eval": _Evil(eval, f"__import__('os').system({cmd!r})"),
        "exec": _Evil(exec, f"import os; os.system({cmd!r})"),
        "subprocess": _Evil(subprocess.call, ["touch", str(target)]),
        "getattr": _Evil(getattr, (1, "real")),
    }


@pytest.mark.parametrize("case", ["os.system", "eval", "exec", "subprocess", "getattr"])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_plain_pickle_is_refused(tmp_path, case, protocol):
    pytest.importorskip("torch")
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "args": _evil_cases(target)[case]}, f, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="refused") as info:
        convert.load_pytorch_checkpoint(path, TINY)
    assert isinstance(info.value, ValueError)
    forbidden = {"os.system": "system", "eval": "builtins.eval", "exec": "builtins.exec",
                 "subprocess": "subprocess.call", "getattr": "builtins.getattr"}[case]
    assert forbidden in str(info.value)
    assert not target.exists()


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_malicious_torch_checkpoint_is_refused(tiny_vars, tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    sd = {k: torch.from_numpy(v) for k, v in convert.to_pytorch_state_dict(tiny_vars, TINY).items()}
    torch.save({"epoch": 1, "args": _Evil(os.system, f"touch {target}"), "state_dict": sd}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        convert.load_pytorch_checkpoint(path, TINY)
    with pytest.raises(UnsafeCheckpointError):
        convert.safe_torch_load(path)
    assert not target.exists()
    # Sanity: plain torch.load would have run it.
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_whole_pickled_module_and_torchscript_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    for zip_format in (False, True):
        torch.save({"model": torch.nn.Linear(2, 3)}, tmp_path / "module.pt", _use_new_zipfile_serialization=zip_format)
        with pytest.raises(UnsafeCheckpointError, match="torch.nn"):
            convert.load_pytorch_checkpoint(tmp_path / "module.pt", TINY)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), tmp_path / "script.pt")
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        convert.load_pytorch_checkpoint(tmp_path / "script.pt", TINY)


def test_restricted_unpickler_allow_list():
    up = convert.RestrictedUnpickler(__import__("io").BytesIO(b""))
    import collections
    assert up.find_class("collections", "OrderedDict") is collections.OrderedDict
    assert up.find_class("__builtin__", "set") is set
    for module, name in [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                         ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"),
                         ("torch", "load"), ("torch.nn.modules.linear", "Linear"), ("functools", "partial"),
                         ("mypkg", "run_me"), ("mypkg", "Config.__init__")]:
        with pytest.raises(UnsafeCheckpointError, match=module):
            up.find_class(module, name)
    stub = up.find_class("utils.config", "Config")
    assert issubclass(stub, convert.CheckpointPlaceholder)
    obj = stub(1, x=2)
    obj.__setstate__({"a": 1})
    obj["b"] = 2
    assert obj.to_dict() == {"a": 1, "b": 2}


# ----------------------------------------------------------------------------
# damaged files and mismatches
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_truncated_checkpoint(tiny_vars, tmp_path, zip_format):
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.pth.tar"
    official_checkpoint(tiny_vars, TINY, path, zip_format=zip_format)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        convert.load_pytorch_checkpoint(cut, TINY)
    assert str(cut) in str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_missing_empty_and_foreign_files(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_pytorch_checkpoint(tmp_path / "nope.pt", TINY)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        convert.load_pytorch_checkpoint(tmp_path / "empty.pt", TINY)
    (tmp_path / "text.pt").write_text("hello world, not a checkpoint\n")
    with pytest.raises(CheckpointError):
        convert.load_pytorch_checkpoint(tmp_path / "text.pt", TINY)


def test_missing_tensor_names_the_key(tiny_vars):
    sd = convert.to_pytorch_state_dict(tiny_vars, TINY)
    del sd["module.blocks.3.mobile_inverted_conv.depth_conv.se.fc.expand.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing: 'blocks\.3\.mobile_inverted_conv\.depth_conv"
                                                      r"\.se\.fc\.expand\.bias'"):
        convert.state_dict_to_variables(sd, TINY)


def test_misshaped_tensor_names_key_and_both_shapes(tiny_vars, tmp_path):
    torch = pytest.importorskip("torch")
    key = "module.blocks.2.mobile_inverted_conv.inverted_bottleneck.conv.conv.weight"
    sd = convert.to_pytorch_state_dict(tiny_vars, TINY)
    assert sd[key].shape == (48, 16, 1, 1)
    sd[key] = np.zeros((16, 48, 1, 1), np.float32)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        convert.load_pytorch_checkpoint(path, TINY)
    msg = str(info.value)
    assert "blocks.2.mobile_inverted_conv.inverted_bottleneck.conv.conv.weight" in msg
    assert "[16, 48, 1, 1]" in msg and "[48, 16, 1, 1]" in msg and str(path) in msg


def test_unexpected_keys_strict_and_not(tiny_vars):
    sd = convert.to_pytorch_state_dict(tiny_vars, TINY)
    sd["module.blocks.99.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*blocks\.99\.extra\.weight"):
        convert.state_dict_to_variables(sd, TINY)
    with pytest.warns(UserWarning, match="blocks.99.extra.weight"):
        assert_trees_equal(convert.state_dict_to_variables(sd, TINY, strict=False), tiny_vars)


def test_non_tensor_and_integer_entries_are_refused(tiny_vars):
    sd = convert.to_pytorch_state_dict(tiny_vars, TINY)
    sd["module.classifier.linear.linear.bias"] = "oops"
    with pytest.raises(CheckpointError, match="classifier.linear.linear.bias.*not a tensor"):
        convert.state_dict_to_variables(sd, TINY)
    sd["module.classifier.linear.linear.bias"] = np.zeros((10,), np.int64)
    with pytest.raises(CheckpointError, match="floating point"):
        convert.state_dict_to_variables(sd, TINY)


def test_checkpoint_from_another_space(tiny_vars, alphanet_vars, tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "tiny.pth.tar"
    official_checkpoint(tiny_vars, TINY, path, zip_format=True)
    with pytest.raises(CheckpointMismatchError, match="wrong shape") as info:
        convert.load_pytorch_checkpoint(path)  # default: AlphaNet
    msg = str(info.value)
    assert "first_conv.conv.conv.weight: checkpoint [16, 3, 3, 3] vs expected [24, 3, 3, 3]" in msg
    assert "'alphanet'" in msg and "6 blocks" in msg and "37" in msg
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        convert.state_dict_to_variables(convert.to_pytorch_state_dict(alphanet_vars, ALPHANET), TINY)


def test_to_pytorch_rejects_foreign_variables(tiny_vars):
    with pytest.raises(CheckpointMismatchError, match="params/stem/kernel"):
        convert.to_pytorch_state_dict(tiny_vars, ALPHANET)
    broken = jax.tree.map(lambda a: a, tiny_vars)
    del broken["params"]["head"]
    with pytest.raises(CheckpointMismatchError, match="params/head"):
        convert.to_pytorch_state_dict(broken, TINY)


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        convert.load_pytorch_checkpoint(tmp_path / "x.pt", TINY)


def test_forced_weights_only_env_is_explained(tiny_vars, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.pth.tar"
    official_checkpoint(tiny_vars, TINY, path, zip_format=True)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        convert.load_pytorch_checkpoint(path, TINY)
