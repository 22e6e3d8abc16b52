"""The ONNX export, run in onnxruntime, computes the Flax static subnet's logits."""

import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphanet_jax import errors, export, onnx_export, presets, sampling, search_space as ss, supernet
from alphanet_jax.resolve import resolve
from alphanet_jax.subnet_encoding import encode

ort = pytest.importorskip("onnxruntime")
TINY = ss.get_space("tiny")
ALPHA = ss.get_space("alphanet")


def _random_bn(variables, space, seed):
    """Calibrated BN statistics (one train pass of the max subnet), then perturbed: random means and
    variances different from the batch's, random affine, so the folding is exercised."""
    model = supernet.Supernet(space=space)
    x = jax.random.normal(jax.random.PRNGKey(seed), (4, 16, 16, space.in_channels))
    _, st = jax.jit(lambda v, x: model.apply(v, x, encode(space.max_subnet(), space), train=True,
                                             mutable=["batch_stats"]))(variables, x)
    rng = np.random.default_rng(seed)

    def stats(path, a):
        a = np.asarray(a)
        if str(path[-1]) == "['var']":
            return a * rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
        return a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)

    def params(path, a):
        p = jax.tree_util.keystr(path)
        a = np.asarray(a)
        if p.endswith("['scale']"):
            return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        if "_bn" in p and p.endswith("['bias']"):
            return 0.1 * rng.standard_normal(a.shape).astype(np.float32)
        return a

    return {"params": jax.tree_util.tree_map_with_path(params, variables["params"]),
            "batch_stats": jax.tree_util.tree_map_with_path(stats, st["batch_stats"])}


@pytest.fixture(scope="module")
def tiny_vars():
    return _random_bn(supernet.init_variables(TINY, seed=3), TINY, 0)


def _check(variables, subnet, space, batch=2, seed=0):
    """ORT logits of the exported graph vs the Flax static subnet's, within float32 error bounds."""
    m, sv = export.extract_subnet(variables, subnet, space)
    r = subnet.resolution
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, r, r, space.in_channels)), np.float32)
    ref = np.asarray(jax.jit(lambda v, x: m.apply(v, x))(sv, x))
    proto = onnx_export.subnet_to_onnx(variables, subnet, space)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {onnx_export.INPUT_NAME: np.transpose(x, (0, 3, 1, 2))})[0]
    assert got.shape == ref.shape
    # about 1e-4 relative (measured: ~1e-6 of the largest logit on the tiny space)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))
    return proto


def test_tiny_min_max_and_random_subnets(tiny_vars):
    rng = random.Random(0)
    subnets = [TINY.min_subnet(), TINY.max_subnet()] + [sampling.sample_subnet(TINY, rng) for _ in range(4)]
    kinds = {b.shortcut for s in subnets for b in resolve(s, TINY).blocks}
    assert {"identity", "pool_conv"} <= kinds
    for i, s in enumerate(subnets):
        _check(tiny_vars, s, TINY, seed=i)


def test_graph_states_layout_and_size(tiny_vars):
    s = TINY.max_subnet()
    proto = onnx_export.subnet_to_onnx(tiny_vars, s, TINY)
    (inp,) = proto.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images_nchw" and dims == ["batch", 3, s.resolution, s.resolution]
    assert "NCHW" in proto.graph.doc_string and "NCHW" in proto.doc_string
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Resize" not in ops  # BN folded, no resize inside


def test_slimmable_space_no_residual_and_relu6():
    space = ss.get_space("tiny_slimmable")
    v = _random_bn(supernet.init_variables(space, seed=4), space, 1)
    for s in (space.min_subnet(), space.max_subnet()):
        assert "none" in {b.shortcut for b in resolve(s, space).blocks}
        _check(v, s, space)


@pytest.mark.slow
def test_alphanet_preset_and_random_subnets_at_smallest_resolution():
    v = _random_bn(supernet.init_variables(ALPHA, seed=5), ALPHA, 2)
    rng = random.Random(1)
    r = min(ALPHA.resolutions)
    subnets = [presets.preset("a0", ALPHA)] + [sampling.sample_subnet(ALPHA, rng).replace(resolution=r) for _ in range(2)]
    for i, s in enumerate(subnets):
        _check(v, s, ALPHA, batch=1, seed=i)


def test_bad_inputs_name_the_problem(tiny_vars):
    with pytest.raises(errors.UserError, match="unknown export.format 'tflite'"):
        onnx_export.check_format("tflite")
    bad = TINY.max_subnet().replace(resolution=999)
    with pytest.raises(ss.SearchSpaceError, match="resolution 999"):
        onnx_export.subnet_to_onnx(tiny_vars, bad, TINY)


def test_missing_onnx_names_the_install(monkeypatch, tiny_vars):
    import builtins
    real = builtins.__import__

    def no_onnx(name, *a, **k):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(errors.MissingDependencyError, match=re.escape("pip install -e .[deploy]")):
        onnx_export.subnet_to_onnx(tiny_vars, TINY.min_subnet(), TINY)
    with pytest.raises(errors.MissingDependencyError, match="onnx"):
        onnx_export.check_format("onnx")  # the export task checks this before any work
    assert onnx_export.check_format("flax") == "flax"


def test_readme_deploy_example_runs(tmp_path, tiny_vars):
    s = TINY.max_subnet()
    path = onnx_export.save_onnx(str(tmp_path), tiny_vars, s, TINY)
    readme = open(__file__.rsplit("/tests/", 1)[0] + "/README.md").read()
    section = readme.split("## Deploy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    r = s.resolution
    images = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (2, 3, r, r)), np.float32)
    scope = {"images_nchw": images}
    exec(code.replace("DIR/export/model.onnx", path), scope)
    m, sv = export.extract_subnet(tiny_vars, s, TINY)
    ref = np.asarray(m.apply(sv, jnp.transpose(images, (0, 2, 3, 1))))
    np.testing.assert_allclose(scope["logits"], ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))


@pytest.mark.slow
def test_export_task_with_format_onnx_writes_the_flax_subnet_as_onnx(tmp_path, monkeypatch):
    """`--mode=export --config.export.format=onnx`: model.onnx beside the Flax directory, same logits."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from alphanet_jax import tasks
    from configs import quickstart

    config = quickstart.get_config()
    config.export.update(dict(subnet="min", max_mflops=0.0, format="onnx"))
    space = ss.get_space(config.space)
    v = _random_bn(supernet.init_variables(space, seed=3), space, 4)
    monkeypatch.setattr(tasks.train_lib, "restore_variables", lambda config, source, mesh=None: (v, 0))
    directory = tasks.export_task(config, str(tmp_path))
    m, sv = export.load_subnet_model(directory)
    r = space.min_subnet().resolution
    images = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 3, r, r)), np.float32)
    got = ort.InferenceSession(os.path.join(directory, "model.onnx"), providers=["CPUExecutionProvider"]).run(
        [onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: images})[0]
    ref = np.asarray(m.apply(sv, jnp.transpose(images, (0, 2, 3, 1))))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))
    config.export.format = "tflite"
    with pytest.raises(errors.UserError, match="unknown export.format 'tflite'"):
        tasks.export_task(config, str(tmp_path))
