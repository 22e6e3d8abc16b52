"""The supernet's initial weights and BN statistics at their maximum shapes (spec §2.9).

PyTorch's defaults on the max tensors: uniform(+-1/sqrt(fan_in)) for convolutions, linear weights and
biases, BN scale 1 and bias 0, running mean 0 and variance 1; zero gamma on every block's last BN only in
spaces whose blocks are all residual (see `init_block`). The tree's layout: the `supernet` module docstring.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alphanet_jax.search_space import BlockSpec, SearchSpace

Array = jax.Array

__all__ = ["bn_params", "bn_stats", "uniform_tensors", "init_stem", "init_block", "block_stats", "init_head",
           "head_stats", "init_classifier"]


def bn_params(c: int, zero_scale: bool = False) -> dict:
    return {"scale": jnp.zeros((c,)) if zero_scale else jnp.ones((c,)), "bias": jnp.zeros((c,))}


def bn_stats(c: int) -> dict:
    return {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))}


def uniform_tensors(key: Array, specs: dict[str, tuple[tuple[int, ...], int]]) -> dict[str, Array]:
    """uniform(+-1/sqrt(fan_in)) tensors from ONE random draw (hundreds of draws compile slowly)."""
    sizes = [int(np.prod(shape)) for shape, _ in specs.values()]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = {}, 0
    for (name, (shape, fan_in)), size in zip(specs.items(), sizes):
        out[name] = flat[start:start + size].reshape(shape) / np.float32(np.sqrt(fan_in))
        start += size
    return out


def init_stem(key: Array, space: SearchSpace) -> dict:
    """The stem conv's kernel [k, k, in_channels, max stem width]."""
    c0, k0, cin = max(space.stem_widths), space.stem_kernel, space.in_channels
    return {"kernel": uniform_tensors(key, {"k": ((k0, k0, cin, c0), k0 * k0 * cin)})["k"]}


def init_block(key: Array, b: BlockSpec) -> dict:
    """Block `b`'s parameters: expand (+ BN) when the stage expands, depthwise + BN, SE in SE stages,
    project + BN, and the 1x1 shortcut conv when the space's shortcut is 'always'."""
    k = b.max_kernel
    specs: dict[str, tuple[tuple[int, ...], int]] = {}
    if b.has_expand:
        specs["expand"] = ((b.max_in, b.max_mid), b.max_in)
    specs["dw"] = ((k, k, 1, b.max_mid), k * k)
    if b.se:
        specs["se_reduce.kernel"] = ((b.max_mid, b.max_se), b.max_mid)
        specs["se_reduce.bias"] = ((b.max_se,), b.max_mid)
        specs["se_expand.kernel"] = ((b.max_se, b.max_mid), b.max_se)
        specs["se_expand.bias"] = ((b.max_mid,), b.max_se)
    specs["project"] = ((b.max_mid, b.max_out), b.max_mid)
    if b.shortcut_mode == "always":
        specs["shortcut"] = ((b.max_in, b.max_out), b.max_in)
    t = uniform_tensors(key, specs)
    p: dict[str, Any] = {}
    if b.has_expand:
        p["expand"] = {"kernel": t["expand"]}
        p["expand_bn"] = bn_params(b.max_mid)
    p["dw"] = {"kernel": t["dw"]}
    p["dw_bn"] = bn_params(b.max_mid)
    if b.se:
        p["se_reduce"] = {"kernel": t["se_reduce.kernel"], "bias": t["se_reduce.bias"]}
        p["se_expand"] = {"kernel": t["se_expand.kernel"], "bias": t["se_expand.bias"]}
    p["project"] = {"kernel": t["project"]}
    # Zero gamma on the block's last BN (the AttentiveNAS reference, where every block is residual). With
    # 'identity_when_same' shortcuts (MobileNetV2) many blocks have no residual and would output zeros, so
    # there gamma starts at one, as in torchvision's MobileNetV2 and US-Nets.
    p["project_bn"] = bn_params(b.max_out, zero_scale=b.shortcut_mode == "always")
    if b.shortcut_mode == "always":
        p["shortcut"] = {"kernel": t["shortcut"]}
    return p


def block_stats(b: BlockSpec) -> dict:
    """Block `b`'s BN statistics (one entry per *_bn of `init_block`)."""
    s = {"dw_bn": bn_stats(b.max_mid), "project_bn": bn_stats(b.max_out)}
    if b.has_expand:
        s["expand_bn"] = bn_stats(b.max_mid)
    return s


def init_head(key: Array, space: SearchSpace) -> dict:
    """The head: expand (+ BN) and, in 'v3' heads, the feature mix (spec §2.4)."""
    last, he, hw = space.blocks[-1].max_out, space.head_max_expand, max(space.head_widths)
    if space.head_kind == "v2":
        t = uniform_tensors(key, {"expand": ((last, he), last)})
        return {"expand": {"kernel": t["expand"]}, "expand_bn": bn_params(he)}
    t = uniform_tensors(key, {"expand": ((last, he), last), "mix": ((he, hw), he)})
    return {"expand": {"kernel": t["expand"]}, "expand_bn": bn_params(he), "feature_mix": {"kernel": t["mix"]}}


def head_stats(space: SearchSpace) -> dict:
    return {"expand_bn": bn_stats(space.head_max_expand)}


def init_classifier(key: Array, space: SearchSpace) -> dict:
    hw = max(space.head_widths)
    t = uniform_tensors(key, {"kernel": ((hw, space.num_classes), hw), "bias": ((space.num_classes,), hw)})
    return {"kernel": t["kernel"], "bias": t["bias"]}
