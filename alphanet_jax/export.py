"""Static subnets: sliced weights, no masks, for deployment and as a check of the supernet.

`extract_subnet(variables, subnet)` slices the supernet's variables exactly as the
reference's `get_active_subnet` (spec §10.3) and returns a plain Flax model whose
eval-mode logits equal the masked supernet's for that subnet. `save_subnet` /
`load_subnet_model` store it as a directory: `config.json` (space, subnet and BN epsilon) and
`variables.npz` (no pickle).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alphanet_jax import depthwise as depthwise_lib
from alphanet_jax import layers
from alphanet_jax.errors import PathNotFoundError, UserError
from alphanet_jax.resolve import ActiveBlock, resolve
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

Array = jax.Array
FORMAT = "alphanet-jax-subnet/1"


def _bn(x, p, s, train, eps, axis_name=None, group_size=0):
    y, new = layers.batch_norm(x, p, s, jnp.ones((x.shape[-1],), bool), train=train, eps=eps, axis_name=axis_name,
                               group_size=group_size)
    return y, new


def _static_bn(module: nn.Module, name: str, x: Array, c: int, *, train: bool, eps: float,
               axis_name: str | None = None, group_size: int = 0) -> Array:
    """A named BN of `module` over all c channels; writes batch statistics when they are mutable."""
    p = module.param(name, lambda k: {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))})
    sv = module.variable("batch_stats", name, lambda: {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))})
    y, new = _bn(x, p, sv.value, train, eps, axis_name, group_size)
    if train and module.is_mutable_collection("batch_stats") and not module.is_initializing():
        sv.value = new
    return y


def _kernel(module: nn.Module, name: str, shape: tuple[int, ...]) -> Array:
    return module.param(name, lambda k: {"kernel": jnp.zeros(shape)})["kernel"]


class StaticSubnet(nn.Module):
    """One subnet with static shapes: resize, stem, active blocks, head, classifier.

    `bn_axis_name` pmean's train-mode BN statistics over a shard_map axis, as `Supernet`'s
    (training runs the min subnet as a static subnet, sandwich.SandwichStep).
    `bn_group_size` g > 0: ghost BN in train mode, as `supernet.Supernet`'s.
    """

    space: SearchSpace
    subnet: SubnetConfig
    dtype: Any = jnp.float32
    bn_eps: float = 1e-5
    depthwise_impl: str = "auto"
    bn_axis_name: str | None = None
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        space, rs = self.space, resolve(self.subnet, self.space)
        dt = self.dtype
        bn = functools.partial(_static_bn, self, train=train, eps=self.bn_eps, axis_name=self.bn_axis_name,
                               group_size=self.bn_group_size)
        w = functools.partial(_kernel, self)
        act = layers.activation(space.act)
        x = layers.resize_bicubic(images.astype(jnp.float32), rs.resolution).astype(dt)
        k0 = space.stem_kernel
        x = layers.conv2d(x, w("stem", (k0, k0, space.in_channels, rs.stem_width)), space.stem_stride)
        x = act(bn("stem_bn", x, rs.stem_width))
        for j, b in enumerate(rs.blocks):
            x = _StaticBlock(b, self.bn_eps, dt, self.depthwise_impl, self.bn_axis_name, self.bn_group_size,
                             name=f"blocks{j}")(x, train)
        c = rs.blocks[-1].out_ch if rs.blocks else rs.stem_width
        v3 = space.head_kind == "v3"

        def init_head(k):
            h = {"expand": {"kernel": jnp.zeros((c, rs.head_expand))},
                 "expand_bn": {"scale": jnp.ones((rs.head_expand,)), "bias": jnp.zeros((rs.head_expand,))}}
            if v3:
                h["feature_mix"] = {"kernel": jnp.zeros((rs.head_expand, rs.head_width))}
            return h

        hp = self.param("head", init_head)
        hs = self.variable("batch_stats", "head", lambda: {"expand_bn": {
            "mean": jnp.zeros((rs.head_expand,)), "var": jnp.ones((rs.head_expand,))}})
        x = layers.pointwise(x, hp["expand"]["kernel"])
        x, new = _bn(x, hp["expand_bn"], hs.value["expand_bn"], train, self.bn_eps, self.bn_axis_name,
                     self.bn_group_size)
        if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
            hs.value = {"expand_bn": new}
        x = act(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dt)
        if v3:
            x = act(x @ hp["feature_mix"]["kernel"].astype(dt))
        cp = self.param("classifier", lambda k: {"kernel": jnp.zeros((rs.head_width, space.num_classes)),
                                                 "bias": jnp.zeros((space.num_classes,))})
        return layers.classifier(x, cp["kernel"], cp["bias"])  # float32, as the supernet's


class _StaticBlock(nn.Module):
    b: ActiveBlock
    bn_eps: float
    dtype: Any
    depthwise_impl: str = "auto"
    bn_axis_name: str | None = None
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        b = self.b
        act = layers.activation(b.act)

        bn = functools.partial(_static_bn, self, train=train, eps=self.bn_eps, axis_name=self.bn_axis_name,
                               group_size=self.bn_group_size)
        kernel = functools.partial(_kernel, self)

        h = x
        if b.has_expand:
            h = act(bn("expand_bn", layers.pointwise(h, kernel("expand", (b.in_ch, b.mid))), b.mid))
        h = depthwise_lib.depthwise(h, kernel("dw", (b.kernel, b.kernel, 1, b.mid)), b.stride, self.depthwise_impl)
        h = act(bn("dw_bn", h, b.mid))
        if b.se_mid:
            se_r = self.param("se_reduce", lambda k: {"kernel": jnp.zeros((b.mid, b.se_mid)),
                                                      "bias": jnp.zeros((b.se_mid,))})
            se_e = self.param("se_expand", lambda k: {"kernel": jnp.zeros((b.se_mid, b.mid)),
                                                      "bias": jnp.zeros((b.mid,))})
            z = jax.nn.relu(jnp.mean(h.astype(jnp.float32), axis=(1, 2)) @ se_r["kernel"] + se_r["bias"])
            g = layers.hard_sigmoid(z @ se_e["kernel"] + se_e["bias"])
            h = h * g[:, None, None, :].astype(h.dtype)
        h = bn("project_bn", layers.pointwise(h, kernel("project", (b.mid, b.out_ch))), b.out_ch)
        if b.shortcut == "none":  # MobileNetV2: no residual when strided or the widths change
            return h
        sc = layers.avg_pool_2x2(x) if b.stride > 1 else x
        if b.shortcut in ("conv", "pool_conv"):
            sc = layers.pointwise(sc, kernel("shortcut", (b.in_ch, b.out_ch)))
        return h + sc


def conv_out_size(width: int, kernel: int, stride: int) -> int:
    """A conv's output width with the reference's symmetric k//2 padding (`layers.conv2d`)."""
    return (width + 2 * (kernel // 2) - kernel) // stride + 1


def _slice_bn(p: dict, c: int) -> dict:
    return {k: v[:c] for k, v in p.items()}


def slice_variables(variables: dict, subnet: SubnetConfig, space: SearchSpace | None = None) -> dict:
    """The static subnet's variables, sliced from the supernet's (spec §10.3)."""
    space = get_space(space)
    rs = resolve(subnet, space)
    P, S = variables["params"], variables.get("batch_stats", {})
    p: dict[str, Any] = {"stem": {"kernel": P["stem"]["kernel"][..., : rs.stem_width]},
                         "stem_bn": _slice_bn(P["stem_bn"], rs.stem_width)}
    s: dict[str, Any] = {"stem_bn": _slice_bn(S["stem_bn"], rs.stem_width)}
    for j, b in enumerate(rs.blocks):
        bp, bs = P[f"block{b.index}"], S[f"block{b.index}"]
        kmax = bp["dw"]["kernel"].shape[0]
        o = (kmax - b.kernel) // 2
        q: dict[str, Any] = {}
        t: dict[str, Any] = {}
        if b.has_expand:
            q["expand"] = {"kernel": bp["expand"]["kernel"][: b.in_ch, : b.mid]}
            q["expand_bn"], t["expand_bn"] = _slice_bn(bp["expand_bn"], b.mid), _slice_bn(bs["expand_bn"], b.mid)
        q["dw"] = {"kernel": bp["dw"]["kernel"][o: o + b.kernel, o: o + b.kernel, :, : b.mid]}
        q["dw_bn"], t["dw_bn"] = _slice_bn(bp["dw_bn"], b.mid), _slice_bn(bs["dw_bn"], b.mid)
        if b.se_mid:
            q["se_reduce"] = {"kernel": bp["se_reduce"]["kernel"][: b.mid, : b.se_mid],
                              "bias": bp["se_reduce"]["bias"][: b.se_mid]}
            q["se_expand"] = {"kernel": bp["se_expand"]["kernel"][: b.se_mid, : b.mid],
                              "bias": bp["se_expand"]["bias"][: b.mid]}
        q["project"] = {"kernel": bp["project"]["kernel"][: b.mid, : b.out_ch]}
        q["project_bn"], t["project_bn"] = _slice_bn(bp["project_bn"], b.out_ch), _slice_bn(bs["project_bn"],
                                                                                             b.out_ch)
        if b.shortcut in ("conv", "pool_conv"):
            q["shortcut"] = {"kernel": bp["shortcut"]["kernel"][: b.in_ch, : b.out_ch]}
        p[f"blocks{j}"], s[f"blocks{j}"] = q, t
    c = rs.blocks[-1].out_ch if rs.blocks else rs.stem_width
    H = P["head"]
    p["head"] = {"expand": {"kernel": H["expand"]["kernel"][:c, : rs.head_expand]},
                 "expand_bn": _slice_bn(H["expand_bn"], rs.head_expand)}
    if space.head_kind == "v3":
        p["head"]["feature_mix"] = {"kernel": H["feature_mix"]["kernel"][: rs.head_expand, : rs.head_width]}
    s["head"] = {"expand_bn": _slice_bn(S["head"]["expand_bn"], rs.head_expand)}
    p["classifier"] = {"kernel": P["classifier"]["kernel"][: rs.head_width], "bias": P["classifier"]["bias"]}
    return {"params": p, "batch_stats": s}


def extract_subnet(variables: dict, subnet: SubnetConfig, space: SearchSpace | None = None,
                   dtype: Any = jnp.float32, bn_eps: float = 1e-5) -> tuple[StaticSubnet, dict]:
    """A standalone static model and its sliced variables; `model.apply(v, images)` gives logits.
    `bn_eps`: the supernet's (config.model.bn_eps); `save_subnet` records it with the model."""
    space = get_space(space)
    subnet.validate(space)
    model = StaticSubnet(space=space, subnet=subnet, dtype=dtype, bn_eps=float(bn_eps))
    return model, slice_variables(variables, subnet, space)


def num_params(variables: dict) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))


def save_subnet(directory: str, model: StaticSubnet, variables: dict, extra: dict | None = None) -> None:
    """Writes config.json and variables.npz (plain arrays, loadable without pickle)."""
    os.makedirs(directory, exist_ok=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    tmp = os.path.join(directory, "variables.npz.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, os.path.join(directory, "variables.npz"))
    meta = {"format": FORMAT, "space": model.space.to_dict(), "subnet": model.subnet.to_dict(),
            "bn_eps": float(model.bn_eps), "num_params": num_params(variables), **(extra or {})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_subnet_model(directory: str, dtype: Any = jnp.float32) -> tuple[StaticSubnet, dict]:
    """Loads an exported subnet: `model, variables = load_subnet_model(d); model.apply(variables, images)`."""
    cfg_path = os.path.join(directory, "config.json")
    npz_path = os.path.join(directory, "variables.npz")
    for path in (cfg_path, npz_path):
        if not os.path.exists(path):
            raise PathNotFoundError(f"{path} is missing: {directory!r} is not an exported subnet directory "
                                    f"(made by `launch.py --mode=export`)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    space = get_space(meta["space"])
    subnet = SubnetConfig.from_dict(meta["subnet"], space)
    # Directories written before bn_eps was recorded hold models of the default 1e-5.
    bn_eps = meta.get("bn_eps", 1e-5)
    if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or not 0 < bn_eps < float("inf"):
        raise UserError(f"{cfg_path}: bn_eps {bn_eps!r} is not a number > 0")
    model = StaticSubnet(space=space, subnet=subnet, dtype=dtype, bn_eps=float(bn_eps))
    with np.load(npz_path, allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    variables: dict[str, Any] = {}
    for key, arr in flat.items():
        node = variables
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(arr)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, subnet.resolution, subnet.resolution, space.in_channels)))
    _check_tree(expected, variables, npz_path)
    return model, variables


def _check_tree(expected: Any, got: Any, where: str) -> None:
    exp = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    missing = sorted(set(exp) - set(have))
    extra = sorted(set(have) - set(exp))
    bad = sorted(k for k in set(exp) & set(have) if tuple(exp[k]) != tuple(have[k]))
    if missing or extra or bad:
        raise UserError(f"{where}: variables do not fit the subnet: missing {missing[:5]}, unexpected "
                        f"{extra[:5]}, mis-shaped {[(k, have[k], exp[k]) for k in bad[:5]]}")
