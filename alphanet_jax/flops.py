"""FLOPs (multiply-accumulates) and parameter counts of a subnet, by formula.

Pure Python, no jax import: it runs inside search loops. The rules are the
reference's (spec §5.1): a conv costs C_in x C_out x H_out x W_out x k^2 / groups,
a linear layer in x out; BN, activations, pooling, the SE multiply, residual
adds, biases and the input resize are free; both SE 1x1 convs count (on 1x1
maps) and a shortcut 1x1 conv counts only when it runs.

The same rules cover both head kinds ('v3': final expand + feature mix; 'v2': one
1x1 conv) and shortcut modes ('identity_when_same' has no shortcut layers). For
the slimmable MobileNetV2 space at 224 this gives 300.77 MFLOPs / 3,504,872
params at 1.0x (MobileNetV2's published 300 M multiply-adds, 3.4 M params; the
exact parameter count of torchvision's mobilenet_v2 with BN) and 59.29 MFLOPs at
0.35x (published 59 M).
"""

from __future__ import annotations

from alphanet_jax.resolve import ResolvedSubnet, resolve
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space


def _conv(c_in: int, c_out: int, size_out: int, k: int = 1, groups: int = 1) -> float:
    return c_in * c_out * size_out * size_out * k * k / groups


def _down(size: int, stride: int) -> int:
    return size // stride if size % stride == 0 else (size + 1) // stride


def layer_flops(subnet: SubnetConfig, space: SearchSpace | None = None) -> list[tuple[str, float]]:
    """Per-layer MACs (name, count), in execution order; `count_flops` is their sum / 1e6."""
    space = get_space(space)
    rs: ResolvedSubnet = resolve(subnet, space)
    out: list[tuple[str, float]] = []
    size = subnet.resolution // space.stem_stride
    out.append(("stem", _conv(space.in_channels, rs.stem_width, size, space.stem_kernel)))
    for b in rs.blocks:
        name = f"block{b.index}"
        if b.has_expand:
            out.append((f"{name}.expand", _conv(b.in_ch, b.mid, size)))
        size = _down(size, b.stride)
        out.append((f"{name}.depthwise", _conv(b.mid, b.mid, size, b.kernel, groups=b.mid)))
        out.append((f"{name}.project", _conv(b.mid, b.out_ch, size)))
        if b.se_mid:
            out.append((f"{name}.se", 2 * _conv(b.mid, b.se_mid, 1)))
        if b.shortcut in ("conv", "pool_conv"):
            out.append((f"{name}.shortcut", _conv(b.in_ch, b.out_ch, size)))
    last = rs.blocks[-1].out_ch if rs.blocks else rs.stem_width
    out.append(("head.final_expand", _conv(last, rs.head_expand, size)))
    if space.head_kind == "v3":
        out.append(("head.feature_mix", _conv(rs.head_expand, rs.head_width, 1)))
    out.append(("classifier", float(rs.head_width * space.num_classes)))
    return out


def count_flops(subnet: SubnetConfig, space: SearchSpace | None = None) -> float:
    """MFLOPs of a subnet: multiply-accumulates / 1e6, the reference's convention (spec §5.1).

    `space` defaults to the AlphaNet space. E.g. AlphaNet-A0 gives 203.39.
    """
    return sum(v for _, v in layer_flops(subnet, space)) / 1e6


def param_counts(subnet: SubnetConfig, space: SearchSpace | None = None,
                 include_unused_shortcuts: bool = False) -> dict[str, int]:
    """Number of parameters per layer of the static (exported) subnet, by name."""
    space = get_space(space)
    rs = resolve(subnet, space)
    n: dict[str, int] = {}
    n["stem"] = space.in_channels * rs.stem_width * space.stem_kernel ** 2 + 2 * rs.stem_width
    for b in rs.blocks:
        name = f"block{b.index}"
        if b.has_expand:
            n[f"{name}.expand"] = b.in_ch * b.mid + 2 * b.mid
        n[f"{name}.depthwise"] = b.mid * b.kernel ** 2 + 2 * b.mid
        if b.se_mid:
            n[f"{name}.se"] = 2 * b.mid * b.se_mid + b.mid + b.se_mid
        n[f"{name}.project"] = b.mid * b.out_ch + 2 * b.out_ch
        if b.shortcut in ("conv", "pool_conv") or (include_unused_shortcuts and space.shortcut == "always"):
            n[f"{name}.shortcut"] = b.in_ch * b.out_ch
    last = rs.blocks[-1].out_ch if rs.blocks else rs.stem_width
    n["head.final_expand"] = last * rs.head_expand + 2 * rs.head_expand
    if space.head_kind == "v3":
        n["head.feature_mix"] = rs.head_expand * rs.head_width
    n["classifier"] = rs.head_width * space.num_classes + space.num_classes
    return n


def count_params(subnet: SubnetConfig, space: SearchSpace | None = None,
                 include_unused_shortcuts: bool = False) -> int:
    """Trainable parameters of the static subnet (BN scale/bias and SE biases included).

    By default this is the count of the model that actually runs, and of the
    exported model: **without** the 1x1 shortcut-conv weights of blocks whose
    shortcut is identity or pool-only (never executed). The reference's profile
    counter (spec §5.2, "params M (profile)") includes them: pass
    `include_unused_shortcuts=True` for that number (A0: 8,954,xxx vs 9,065,xxx).
    """
    return sum(param_counts(subnet, space, include_unused_shortcuts).values())
