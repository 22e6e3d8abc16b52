"""ONNX export of a static subnet, for deployment (onnxruntime, mobile converters).

`subnet_to_onnx(variables, subnet, space)` builds the graph of `export.StaticSubnet` with the
`onnx` helper API from the same resolved architecture (`search_space.resolve`): stem, active
blocks with their shortcut kinds, SE, activations, head, classifier; weights sliced by
`export.slice_variables`. Eval-mode BN is folded into the conv before it (exact in real
arithmetic: y = conv(x, w) * s + (bias - mean * s) with s = scale / sqrt(var + eps)).

Input: float32 NCHW (the ONNX convention; the Flax model is NHWC), named `images_nchw`, fixed at
the subnet's resolution (batch dimension free). The Flax model resizes (bicubic) only inputs whose
width differs from the resolution; the ONNX graph has no resize: feed images at the resolution.
`onnx` is an optional dependency (`pip install -e .[deploy]`), imported only here, when called.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from alphanet_jax import export as export_lib
from alphanet_jax.errors import MissingDependencyError, UserError
from alphanet_jax.resolve import resolve
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

INPUT_NAME = "images_nchw"
OUTPUT_NAME = "logits"
OPSET = 17
FORMATS = ("flax", "onnx")


def check_format(fmt: str) -> str:
    """The export format, or a UserError naming the known ones; for "onnx", checks that `onnx` is installed
    (so a missing package fails before any work)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export.format {fmt!r}: one of {list(FORMATS)}")
    if fmt == "onnx":
        _onnx()
    return fmt


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("ONNX export needs the `onnx` package, an optional dependency: "
                                     "pip install -e .[deploy]") from None
    return onnx


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, onnx: Any, eps: float):
        self.onnx, self.eps = onnx, eps
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    def op(self, kind: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(self.onnx.helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, w_oihw: np.ndarray, name: str, stride: int = 1, group: int = 1,
             bn: tuple[dict, dict] | None = None, bias: np.ndarray | None = None) -> str:
        """Conv with the reference's symmetric k//2 padding; an eval-mode BN folded in."""
        w = np.asarray(w_oihw, np.float32)
        if bn is not None:
            p, s = (_np(bn[0]), _np(bn[1]))
            mul = p["scale"] / np.sqrt(s["var"] + np.float32(self.eps))
            w = w * mul[:, None, None, None]
            bias = p["bias"] - s["mean"] * mul
        k = w.shape[-1]
        ins = [x, self.const(f"{name}.weight", w)]
        if bias is not None:
            ins.append(self.const(f"{name}.bias", np.asarray(bias, np.float32)))
        return self.op("Conv", ins, name, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                       group=group)

    def act(self, x: str, kind: str, name: str) -> str:
        if kind == "swish":
            return self.op("Mul", [x, self.op("Sigmoid", [x], f"{name}.sigmoid")], name)
        if kind == "relu":
            return self.op("Relu", [x], name)
        if kind == "relu6":
            return self.op("Clip", [x, self.const(f"{name}.lo", np.float32(0)), self.const(f"{name}.hi", np.float32(6))],
                           name)
        raise UserError(f"activation {kind!r} has no ONNX mapping (swish, relu, relu6)")


def _np(tree: dict) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def _hwio_to_oihw(w: Any) -> np.ndarray:
    return np.transpose(np.asarray(w, np.float32), (3, 2, 0, 1))


def _pw(w: Any) -> np.ndarray:
    """[C_in, C_out] pointwise kernel -> [C_out, C_in, 1, 1]."""
    return np.asarray(w, np.float32).T[:, :, None, None]


def subnet_to_onnx(variables: dict, subnet: SubnetConfig, space: SearchSpace | None = None,
                   bn_eps: float = 1e-5, doc: str = "") -> Any:
    """The subnet as an onnx.ModelProto: input `images_nchw` [N, C, R, R] float32, output `logits` [N, classes]."""
    onnx = _onnx()
    space = get_space(space)
    subnet.validate(space)  # names the field and value that do not fit the space
    rs = resolve(subnet, space)
    v = export_lib.slice_variables(variables, subnet, space)
    P, S = v["params"], v["batch_stats"]
    g = _Graph(onnx, bn_eps)
    x = _stem(g, INPUT_NAME, P, S, space)
    width = export_lib.conv_out_size(rs.resolution, space.stem_kernel, space.stem_stride)
    for j, b in enumerate(rs.blocks):
        x = _block(g, x, width, b, P[f"blocks{j}"], S[f"blocks{j}"], f"blocks{j}")
        width = export_lib.conv_out_size(width, b.kernel, b.stride)
    _head(g, x, P, S, space, OUTPUT_NAME)
    r = rs.resolution
    inp = onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", space.in_channels, r, r])
    out = onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", space.num_classes])
    layout = (f"Input {INPUT_NAME}: float32 NCHW [batch, {space.in_channels}, {r}, {r}], normalised as in "
              f"training; no resize inside. Output {OUTPUT_NAME}: [batch, {space.num_classes}].")
    graph = onnx.helper.make_graph(g.nodes, f"{space.name}_subnet", [inp], [out], g.inits,
                                   doc_string=f"{layout} Subnet {subnet.to_json()}. {doc}".strip())
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="alphanet-jax", doc_string=layout)
    onnx.checker.check_model(model)
    return model


def _stem(g: _Graph, x: str, P: dict, S: dict, space: SearchSpace) -> str:
    x = g.conv(x, _hwio_to_oihw(P["stem"]["kernel"]), "stem", space.stem_stride, bn=(P["stem_bn"], S["stem_bn"]))
    return g.act(x, space.act, "stem.act")


def _head(g: _Graph, x: str, P: dict, S: dict, space: SearchSpace, out: str) -> str:
    """Head (1x1 conv, BN, activation, pool, v3: feature mix) and classifier, as export.StaticSubnet."""
    H, HS = P["head"], S["head"]
    x = g.conv(x, _pw(H["expand"]["kernel"]), "head.expand", bn=(H["expand_bn"], HS["expand_bn"]))
    x = g.act(x, space.act, "head.expand.act")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "head.pool")], "head.flatten", axis=1)
    if space.head_kind == "v3":
        x = g.op("MatMul", [x, g.const("head.feature_mix.weight", np.asarray(H["feature_mix"]["kernel"]))],
                 "head.feature_mix")
        x = g.act(x, space.act, "head.feature_mix.act")
    C = P["classifier"]
    return g.op("Gemm", [x, g.const("classifier.weight", np.asarray(C["kernel"])),
                         g.const("classifier.bias", np.asarray(C["bias"]))], out)


def part_to_onnx(kind: str, variables: dict, space: SearchSpace, width: int, channels: int, block: Any = None,
                 bn_eps: float = 1e-5) -> Any:
    """One part of a subnet (kind stem, block or head; variables in `export.StaticSubnet`'s layout: the
    stem's or head's entries, or one block's) as a model with input `x` [batch, channels, width, width]
    and output `y`: what `latency_measure` times in onnxruntime."""
    onnx = _onnx()
    g = _Graph(onnx, bn_eps)
    P, S = variables["params"], variables["batch_stats"]
    if kind == "stem":
        g.op("Identity", [_stem(g, "x", P, S, space)], "y")
    elif kind == "block":
        g.op("Identity", [_block(g, "x", width, block, P, S, "block")], "y")
    else:
        _head(g, "x", P, S, space, "y")
    inp = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", channels, width, width])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph(g.nodes, f"{space.name}_{kind}", [inp], [out], g.inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                  producer_name="alphanet-jax")


def _block(g: _Graph, x: str, width: int, b: Any, q: dict, t: dict, name: str) -> str:
    """One inverted-residual block (input `width` pixels wide), as export._StaticBlock."""
    h = x
    if b.has_expand:
        h = g.act(g.conv(h, _pw(q["expand"]["kernel"]), f"{name}.expand", bn=(q["expand_bn"], t["expand_bn"])),
                  b.act, f"{name}.expand.act")
    h = g.conv(h, _hwio_to_oihw(q["dw"]["kernel"]), f"{name}.dw", b.stride, group=b.mid,
               bn=(q["dw_bn"], t["dw_bn"]))
    h = g.act(h, b.act, f"{name}.dw.act")
    if b.se_mid:
        z = g.op("GlobalAveragePool", [h], f"{name}.se.pool")
        z = g.conv(z, _pw(q["se_reduce"]["kernel"]), f"{name}.se.reduce", bias=np.asarray(q["se_reduce"]["bias"]))
        z = g.op("Relu", [z], f"{name}.se.relu")
        z = g.conv(z, _pw(q["se_expand"]["kernel"]), f"{name}.se.expand", bias=np.asarray(q["se_expand"]["bias"]))
        z = g.op("HardSigmoid", [z], f"{name}.se.gate", alpha=1.0 / 6.0, beta=0.5)  # relu6(z + 3) / 6
        h = g.op("Mul", [h, z], f"{name}.se")
    h = g.conv(h, _pw(q["project"]["kernel"]), f"{name}.project", bn=(q["project_bn"], t["project_bn"]))
    if b.shortcut == "none":
        return h
    sc = x
    if b.stride > 1:  # export's avg_pool_2x2: 2x2/2, zero padding 1 (counted) for an odd width
        pad = width % 2
        sc = g.op("AveragePool", [sc], f"{name}.shortcut.pool", kernel_shape=[2, 2], strides=[2, 2],
                  pads=[pad] * 4, count_include_pad=1)
    if b.shortcut in ("conv", "pool_conv"):
        sc = g.conv(sc, _pw(q["shortcut"]["kernel"]), f"{name}.shortcut")
    return g.op("Add", [h, sc], f"{name}.add")


def save_onnx(directory: str, variables: dict, subnet: SubnetConfig, space: SearchSpace | None = None,
              bn_eps: float = 1e-5, doc: str = "") -> str:
    """Writes DIRECTORY/model.onnx (atomically) and returns its path."""
    model = subnet_to_onnx(variables, subnet, space, bn_eps, doc)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.onnx")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
    return path
