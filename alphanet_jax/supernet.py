"""The masked supernet (Flax Linen), for every search-space family (AlphaNet, slimmable MobileNetV2).

Every weight is held at its maximum shape (spec §1.2; initialised by `supernet_init`). A subnet enters
as arrays (`subnet_encoding.EncodedSubnet`): elastic width, expand ratio, kernel size and SE width
become channel/kernel masks, depth skips blocks with `lax.cond`. Only the input
resolution is static, so one compiled program per resolution serves every
subnet. Inactive channels are exactly zero after every BN and activation, which
makes the masked network compute what the reference's sliced network computes.

Variables: `params` and `batch_stats`, nested by layer:
  stem{kernel [3,3,3,C]}, stem_bn{scale,bias}
  block{i}: expand{kernel [in,mid]}, expand_bn, dw{kernel [k,k,1,mid]}, dw_bn,
            se_reduce{kernel [mid,m], bias}, se_expand{kernel [m,mid], bias},
            project{kernel [mid,out]}, project_bn, shortcut{kernel [in,out]}
            (expand only when the stage expands, se_* only in SE stages, shortcut only when
            the space's shortcut is 'always')
  head ('v3'): expand{kernel [w7,6*w7]}, expand_bn, feature_mix{kernel [6*w7,w_last]}
  head ('v2'): expand{kernel [w7,w_last]}, expand_bn   (MobileNetV2's last 1x1 conv + BN)
  classifier{kernel [w_last, classes], bias}
batch_stats mirror the *_bn entries with {mean, var}.

Shortcuts follow the space: 'always' (AttentiveNAS: identity, 2x2 avg-pool when strided,
1x1 conv when the active widths differ) or 'identity_when_same' (MobileNetV2: the input is
added only when the block has stride 1 and equal active in/out widths, decided at run time).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alphanet_jax import depthwise as depthwise_lib
from alphanet_jax import layers
from alphanet_jax import supernet_init
from alphanet_jax.search_space import BlockSpec, SearchSpace, SubnetConfig, get_space
from alphanet_jax.subnet_encoding import EncodedSubnet, encode

Array = jax.Array


# ----------------------------------------------------------------------------
# Forward pieces (pure functions of params, stats and the encoded subnet)
# ----------------------------------------------------------------------------


def _block_forward(p: dict, s: dict, x: Array, e: dict, b: BlockSpec, *, train: bool, eps: float,
                   axis_name: str | None, dc_rate: Array, dc_static: bool, rng: Array | None,
                   index: Any = None, depthwise_impl: str = "auto", kernel_sizes: tuple[int, ...] = (),
                   bn_group_size: int = 0) -> tuple[Array, dict]:
    """One block at its maximum shape under the subnet's masks `e`.

    `dc_rate` is the block's drop-connect rate (the run's rate x its multiplier i / num_blocks),
    applied when `dc_static` and an rng are given; `index` (default b.index, traced inside a scan)
    folds the block into the rng. `kernel_sizes` (the stage's choices) let the depthwise conv run
    only the active kernel window's taps (`depthwise.depthwise`). `bn_group_size`: ghost BN
    (`layers.batch_norm`).
    """
    act = layers.activation(b.act)
    in_m = layers.channel_mask(e["in_ch"], b.max_in)
    mid_m = layers.channel_mask(e["mid"], b.max_mid)
    out_m = layers.channel_mask(e["out_ch"], b.max_out)
    new: dict[str, Any] = {}
    h = x
    if b.has_expand:
        h = layers.pointwise(h, p["expand"]["kernel"] * (in_m[:, None] & mid_m[None, :]))
        h = layers.save(h, layers.SAVED_CONV)
        h, new["expand_bn"] = layers.batch_norm(h, p["expand_bn"], s["expand_bn"], mid_m, train=train, eps=eps,
                                                axis_name=axis_name, group_size=bn_group_size)
        h = jnp.where(mid_m, act(h), 0)
    kmask = layers.kernel_mask(e["kernel"], b.max_kernel)[:, :, None, None] & mid_m
    h = depthwise_lib.depthwise(h, p["dw"]["kernel"] * kmask, b.stride, depthwise_impl,
                                active_kernel=e["kernel"], kernel_sizes=kernel_sizes)
    h = layers.save(h, layers.SAVED_CONV)
    h, new["dw_bn"] = layers.batch_norm(h, p["dw_bn"], s["dw_bn"], mid_m, train=train, eps=eps,
                                        axis_name=axis_name, group_size=bn_group_size)
    h = jnp.where(mid_m, act(h), 0)
    if b.se:
        se_m = layers.channel_mask(e["se"], b.max_se)
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # inactive channels are 0
        z = pooled @ (p["se_reduce"]["kernel"] * (mid_m[:, None] & se_m[None, :]))
        z = jax.nn.relu(z + p["se_reduce"]["bias"] * se_m)
        g = z @ (p["se_expand"]["kernel"] * (se_m[:, None] & mid_m[None, :]))
        g = layers.hard_sigmoid(g + p["se_expand"]["bias"] * mid_m)
        g = layers.save(g, layers.SAVED_SE)
        h = h * g[:, None, None, :].astype(h.dtype)
    h = layers.pointwise(h, p["project"]["kernel"] * (mid_m[:, None] & out_m[None, :]))
    h = layers.save(h, layers.SAVED_CONV)
    h, new["project_bn"] = layers.batch_norm(h, p["project_bn"], s["project_bn"], out_m, train=train, eps=eps,
                                             axis_name=axis_name, group_size=bn_group_size)
    if b.shortcut_mode == "always":
        # Shortcut (spec §2.3): pool if strided, 1x1 conv if the active widths differ.
        sc = layers.avg_pool_2x2(x) if b.stride > 1 else x
        if b.position == 0:
            conv = layers.save(layers.pointwise(sc, p["shortcut"]["kernel"] * (in_m[:, None] & out_m[None, :])),
                                   layers.SAVED_CONV)
            sc = jnp.where(e["in_ch"] != e["out_ch"], conv, layers.fit_channels(sc, b.max_out))
    elif b.stride > 1:  # 'identity_when_same' (MobileNetV2): no residual in strided blocks
        sc = None
    elif b.position > 0:  # inside a stage: in == out always
        sc = x
    else:  # the first block of a stride-1 stage: residual only when the active widths agree
        sc = jnp.where(e["in_ch"] == e["out_ch"], layers.fit_channels(x, b.max_out), jnp.zeros((), x.dtype))
    if dc_static and rng is not None:
        # Drop-connect only on identity-shaped shortcuts, one Bernoulli per sample (spec §2.8).
        keep = 1.0 - dc_rate
        u = jax.random.uniform(jax.random.fold_in(rng, b.index if index is None else index), (x.shape[0], 1, 1, 1))
        m = jnp.floor(keep + u) / keep
        identity = (b.stride == 1) & (e["in_ch"] == e["out_ch"])
        h = jnp.where(identity, h * m.astype(h.dtype), h)
    out = h if sc is None else h + sc
    return out, (new if train else None)


def block_groups(space: SearchSpace, by_depth: bool = True) -> list[list[BlockSpec]]:
    """The blocks in execution order, grouped for `forward`: each stage's first block alone, then its
    other blocks (one shape: stride 1, max_in = max_out) run as one scanned body. `by_depth` splits
    those in two groups: the ones every subnet runs (positions below the stage's least depth) and the
    depth-optional ones; without it they stay one group, for `layers.prefix_scan` (which runs a
    stage only as far as the subnet's depth: the always-run blocks are the start of that prefix)."""
    groups: list[list[BlockSpec]] = []
    for si in range(space.num_stages):
        blocks = [space.blocks[i] for i in space.stage_blocks(si)]
        least = max(1, min(space.stages[si].depths))
        groups.append(blocks[:1])
        groups += [g for g in ((blocks[1:least], blocks[least:]) if by_depth else (blocks[1:],)) if g]
    return groups


SCAN_BLOCKS_VALUES = ("auto", "true", "false")  # model.scan_blocks as a string (or a bool)


def resolve_scan_blocks(scan_blocks: bool | str) -> bool:
    """'auto' -> True on CPU (compiles ~2x faster there, benchmarks/RESULTS.md), False elsewhere;
    also True/False or their spelling as a string (a config field holds 'auto', 'true' or 'false')."""
    if isinstance(scan_blocks, (bool, np.bool_)):
        return bool(scan_blocks)
    value = str(scan_blocks).lower()
    if value == "auto":
        return jax.default_backend() == "cpu"
    if value in SCAN_BLOCKS_VALUES:
        return value == "true"
    raise ValueError(f"scan_blocks must be True, False or 'auto', got {scan_blocks!r}")


SKIP_INACTIVE_VALUES = ("auto", "true", "false")  # model.skip_inactive_blocks as a string (or a bool)


def resolve_skip_inactive(skip_inactive: bool | str, scan_blocks: bool) -> bool:
    """'auto' -> True on CPU with scanned blocks (AlphaNet fp32 batch 8: 9.82 -> 9.32 s per sandwich step,
    compile 149 -> 224 s, benchmarks/RESULTS.md), False elsewhere until measured; or True/False."""
    if isinstance(skip_inactive, (bool, np.bool_)):
        return bool(skip_inactive)
    value = str(skip_inactive).lower()
    if value == "auto":
        return scan_blocks and jax.default_backend() == "cpu"
    if value in SKIP_INACTIVE_VALUES:
        return value == "true"
    raise ValueError(f"skip_inactive_blocks must be True, False or 'auto', got {skip_inactive!r}")


BLOCK_RESIDUALS_VALUES = ("auto", "all", "convs")  # model.block_residuals


def resolve_block_residuals(value: str) -> str:
    """What a block keeps for its backward pass: 'all' (every intermediate JAX's autodiff saves: ~20
    full-size tensors per inverted-residual block) or 'convs' (the convolutions' outputs, the SE gate
    and the BN statistics; BN, activations and masks are recomputed elementwise in the backward pass).
    Scanned blocks stack what they keep in memory: 'convs' made the AlphaNet student ~20 % faster on
    the 2-core CPU (benchmarks/RESULTS.md). 'auto': 'convs' on CPU, 'all' elsewhere until measured."""
    value = str(value).lower()
    if value not in BLOCK_RESIDUALS_VALUES:
        raise ValueError(f"block_residuals must be one of {BLOCK_RESIDUALS_VALUES}, got {value!r}")
    if value == "auto":
        return "convs" if jax.default_backend() == "cpu" else "all"
    return value


def drop_connect_rates(space: SearchSpace, only_last_two_stages: bool = True) -> list[float]:
    """Per-block drop-connect multiplier i / num_blocks (spec §2.8), times the run's rate."""
    n = space.num_blocks
    last_two = set(space.stage_blocks(space.num_stages - 1)) | set(space.stage_blocks(space.num_stages - 2))
    return [i / n if (not only_last_two_stages or i in last_two) else 0.0 for i in range(n)]


def _block_fn(b: BlockSpec, dc_static: bool, *, space: SearchSpace, train: bool, bn_eps: float,
              axis_name: str | None, dc_rate: Array, rng: Array | None, depthwise_impl: str, bn_group_size: int,
              collect_stats: bool, remat: bool, skip_inactive: bool, block_residuals: str = "all"):
    """(run, apply) of block `b` in `forward` (its options as given there): run(x, p, s, e, dc_mult, index)
    -> (x, stats) computes one block; apply(..., active, always) also handles a block the subnet may not
    have, as configured."""

    def run(x, p, s, e, dc_mult, index):
        y, ns = _block_forward(p, s, x, e, b, train=train, eps=bn_eps, axis_name=axis_name,
                               dc_rate=dc_rate * dc_mult, dc_static=dc_static, rng=rng, index=index,
                               depthwise_impl=depthwise_impl,
                               kernel_sizes=space.stages[b.stage].kernel_sizes, bn_group_size=bn_group_size)
        return y, (ns if collect_stats else None)

    if remat:
        run = jax.checkpoint(run)
    elif block_residuals == "convs":  # recompute BN, activations and masks from the saved outputs
        # prevent_cse=False: no optimization barriers around the recomputation (inside loops XLA's CSE
        # cannot undo it anyway); the reduce_precision after each saved residual is `layers.save`'s concern.
        run = jax.checkpoint(run, policy=jax.checkpoint_policies.save_only_these_names(*layers.SAVED_NAMES),
                             prevent_cse=False)

    def apply(x, p, s, e, dc_mult, index, active, always: bool):
        if always:  # runs in every subnet
            return run(x, p, s, e, dc_mult, index)

        def skip(x):
            # An inactive block is the identity and leaves its statistics as they were.
            return layers.fit_channels(x, b.max_out), (s if collect_stats else None)

        if skip_inactive:
            return jax.lax.cond(active > 0, lambda x: run(x, p, s, e, dc_mult, index), skip, x)
        y, ns = run(x, p, s, e, dc_mult, index)
        return jnp.where(active > 0, y, layers.fit_channels(x, b.max_out)), ns

    return run, apply


def _stem_forward(params: dict, stats: dict, x: Array, enc: EncodedSubnet, space: SearchSpace, *, train: bool,
                  bn_eps: float, axis_name: str | None, bn_group_size: int) -> tuple[Array, dict]:
    """The stem (conv + BN + act) at the subnet's width: (activations, its BN's new statistics)."""
    stem_m = layers.channel_mask(enc.stem, max(space.stem_widths))
    x = layers.conv2d(x, params["stem"]["kernel"] * stem_m, space.stem_stride)
    x, bn_stats = layers.batch_norm(x, params["stem_bn"], stats["stem_bn"], stem_m, train=train,
                                    eps=bn_eps, axis_name=axis_name, group_size=bn_group_size)
    return jnp.where(stem_m, layers.activation(space.act)(x), 0), bn_stats


def _head_forward(params: dict, stats: dict, x: Array, enc: EncodedSubnet, space: SearchSpace, *, train: bool,
                  dtype: Any, bn_eps: float, axis_name: str | None, bn_group_size: int, dropout_rate: Any,
                  rng: Array | None) -> tuple[Array, dict]:
    """The head at the subnet's widths: (float32 logits, {"expand_bn": its BN's new statistics})."""
    # Head (spec §2.4): expand + BN + act, pool, ['v3': feature mix (no BN, no bias) + act], dropout,
    # classifier. 'v2' (MobileNetV2): the expand is the last 1x1 conv, its output feeds the classifier.
    act = layers.activation(space.act)
    last = space.blocks[-1].max_out
    he_m = layers.channel_mask(enc.head_expand, space.head_max_expand)
    in_m = layers.channel_mask(enc.head_in, last)
    hp = params["head"]
    x = layers.pointwise(x, hp["expand"]["kernel"] * (in_m[:, None] & he_m[None, :]))
    x, hn = layers.batch_norm(x, hp["expand_bn"], stats["head"]["expand_bn"], he_m, train=train,
                              eps=bn_eps, axis_name=axis_name, group_size=bn_group_size)
    x = jnp.where(he_m, act(x), 0)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
    if space.head_kind == "v3":
        hw_m = layers.channel_mask(enc.head_width, max(space.head_widths))
        x = x @ (hp["feature_mix"]["kernel"] * (he_m[:, None] & hw_m[None, :])).astype(dtype)
        x = jnp.where(hw_m, act(x), 0)
    else:
        hw_m = he_m
    if rng is not None:
        rate = jnp.asarray(dropout_rate, jnp.float32)
        keep = jax.random.bernoulli(jax.random.fold_in(rng, 1_000_003), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
    cp = params["classifier"]
    return layers.classifier(x, cp["kernel"] * hw_m[:, None], cp["bias"]), {"expand_bn": hn}


def forward(params: dict, stats: dict, images: Array, enc: EncodedSubnet, *, space: SearchSpace,
            train: bool, dtype: Any = jnp.float32, bn_eps: float = 1e-5, axis_name: str | None = None,
            dropout_rate: Any = 0.0, drop_connect_rate: Any = 0.0, rng: Array | None = None,
            drop_connect_only_last_two_stages: bool = True, skip_inactive: bool = True,
            collect_stats: bool = False, remat: bool = False, depthwise_impl: str = "auto",
            scan_blocks: bool | str = "auto", bn_group_size: int = 0,
            block_residuals: str = "auto") -> tuple[Array, dict | None]:
    """Logits (float32) and, with `collect_stats` in train mode, this batch's BN statistics.

    `remat` recomputes each block's activations in the backward pass instead of keeping
    them (`jax.checkpoint` per block): less device memory for about one extra forward.
    `block_residuals` ('auto', 'all', 'convs'): what each block keeps for the backward pass otherwise
    (`resolve_block_residuals`).
    `depthwise_impl` picks the depthwise convolution's implementation (`depthwise.depthwise`).
    `scan_blocks` runs each stage's same-shape blocks as one `lax.scan` body (`block_groups`):
    the same arithmetic in a program a fraction of the size, so it compiles faster.
    `bn_group_size` g > 0: in train mode every BN normalises each group of g consecutive examples
    with its own statistics (ghost BN, `layers.batch_norm`); 0: over the whole batch.
    Precision: convolutions run in `dtype` with float32 BN statistics and normalisation; the
    classifier, its bias and the logits are float32 whatever `dtype`.
    """
    collect_stats = collect_stats and train
    scan_blocks = resolve_scan_blocks(scan_blocks)
    block_residuals = resolve_block_residuals(block_residuals)
    chex.assert_rank(images, 4)
    if images.shape[-1] != space.in_channels:
        raise ValueError(f"images have {images.shape[-1]} channels, the space expects {space.in_channels} "
                         f"(NHWC layout)")
    x = layers.resize_bicubic(images.astype(jnp.float32), enc.resolution).astype(dtype)
    new: dict[str, Any] = {}
    x, new["stem_bn"] = _stem_forward(params, stats, x, enc, space, train=train, bn_eps=bn_eps,
                                      axis_name=axis_name, bn_group_size=bn_group_size)
    dc_rates = drop_connect_rates(space, drop_connect_only_last_two_stages)
    dc_rate = jnp.asarray(drop_connect_rate, jnp.float32)

    fields = ("in_ch", "mid", "out_ch", "kernel", "se")
    # Depth-optional blocks of a scanned stage run as a loop over the active ones (statistics for
    # calibration come from the scan below, which keeps every block's).
    prefix = skip_inactive and scan_blocks and not collect_stats
    # One loop per stage's same-shape blocks (a scan body, compiled once, instead of two: a smaller
    # program that compiles faster, benchmarks/RESULTS.md).
    for group in block_groups(space, by_depth=not prefix) if scan_blocks else [[b] for b in space.blocks]:
        b = group[0]
        idx = [g.index for g in group]
        always = all(g.position < min(space.stages[g.stage].depths) for g in group)
        dc_static = any(dc_rates[i] > 0 for i in idx)
        run, apply = _block_fn(b, dc_static, space=space, train=train, bn_eps=bn_eps, axis_name=axis_name,
                               dc_rate=dc_rate, rng=rng, depthwise_impl=depthwise_impl, bn_group_size=bn_group_size,
                               collect_stats=collect_stats, remat=remat, skip_inactive=skip_inactive,
                               block_residuals=block_residuals)
        if len(group) == 1 and (always or not prefix):
            x, ns = apply(x, params[f"block{b.index}"], stats[f"block{b.index}"],
                          {k: getattr(enc, k)[b.index] for k in fields}, np.float32(dc_rates[b.index]),
                          b.index, enc.active[b.index], always)
            new[f"block{b.index}"] = ns
            continue
        # Blocks 1.. of a stage have one shape: one scanned body instead of one copy per block
        # (compile time grows with the program's size).
        stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
        ii = np.asarray(idx)
        xs = (stack([params[f"block{i}"] for i in idx]), stack([stats[f"block{i}"] for i in idx]),
              {k: getattr(enc, k)[ii] for k in fields}, jnp.asarray([dc_rates[i] for i in idx], jnp.float32),
              jnp.asarray(ii, jnp.int32), enc.active[ii])
        if prefix and not always:  # inactive blocks are a suffix of the stage: run the active prefix
            x = layers.prefix_scan(lambda x, p, a, run=run: run(x, p, *a)[0], x, xs[0], xs[1:5],
                                   jnp.sum(enc.active[ii]))
            new.update({f"block{i}": None for i in idx})
            continue

        def body(x, xs, apply=apply, always=always):
            return apply(x, *xs, always)

        x, ns = jax.lax.scan(body, x, xs)
        for j, i in enumerate(idx):
            new[f"block{i}"] = None if ns is None else jax.tree.map(lambda a, j=j: a[j], ns)
    logits, new["head"] = _head_forward(params, stats, x, enc, space, train=train, dtype=dtype, bn_eps=bn_eps,
                                        axis_name=axis_name, bn_group_size=bn_group_size,
                                        dropout_rate=dropout_rate, rng=rng)
    return logits, (new if collect_stats else None)


class Supernet(nn.Module):
    """The supernet of `space` (default AlphaNet): `Supernet().apply(variables, images, subnet)` -> logits.

    `subnet` is a SubnetConfig (encoded on the fly, a constant under jit) or an
    EncodedSubnet (traced: one compiled program per resolution serves every subnet).
    `train=True` normalises with batch statistics and leaves the running statistics
    alone (the reference trains with BN momentum 0); call with
    `mutable=['batch_stats']` to receive this batch's statistics (for calibration).
    `bn_axis_name` pmean's BN statistics over a shard_map axis (global BN); None
    keeps them per device, as the reference's `sync_bn: False`.
    Dropout and drop-connect run only when a 'dropout' rng is given.
    `remat` trades compute for memory: block activations are recomputed in the backward pass.
    `bn_group_size` g > 0: ghost BN in train mode, statistics over each group of g consecutive
    examples of the (per-device) batch (`forward`); 0: over the whole batch.
    """

    space: SearchSpace = get_space(None)
    dtype: Any = jnp.float32
    bn_eps: float = 1e-5
    bn_axis_name: str | None = None
    drop_connect_only_last_two_stages: bool = True
    skip_inactive: bool = True
    remat: bool = False
    block_residuals: str = "auto"
    depthwise_impl: str = "auto"
    scan_blocks: bool | str = "auto"
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, images: Array, subnet: SubnetConfig | EncodedSubnet, train: bool = False,
                 dropout_rate: Any = 0.0, drop_connect_rate: Any = 0.0) -> Array:
        space = self.space
        params: dict[str, Any] = {}
        c0 = max(space.stem_widths)
        params["stem"] = self.param("stem", lambda key: supernet_init.init_stem(key, space))
        params["stem_bn"] = self.param("stem_bn", lambda key: supernet_init.bn_params(c0))
        stat_vars = {"stem_bn": self.variable("batch_stats", "stem_bn", lambda: supernet_init.bn_stats(c0))}
        for b in space.blocks:
            name = f"block{b.index}"
            params[name] = self.param(name, lambda key, b=b: supernet_init.init_block(key, b))
            stat_vars[name] = self.variable("batch_stats", name, lambda b=b: supernet_init.block_stats(b))
        params["head"] = self.param("head", lambda key: supernet_init.init_head(key, space))
        stat_vars["head"] = self.variable("batch_stats", "head", lambda: supernet_init.head_stats(space))
        params["classifier"] = self.param("classifier", lambda key: supernet_init.init_classifier(key, space))
        stats = {k: v.value for k, v in stat_vars.items()}

        enc = encode(subnet, space)
        if self.is_initializing():  # shapes only: skip tracing the whole network
            return jnp.zeros((images.shape[0], space.num_classes), jnp.float32)
        rng = self.make_rng("dropout") if (train and self.has_rng("dropout")) else None
        logits, new = forward(params, stats, images, enc, space=space, train=train, dtype=self.dtype,
                              bn_eps=self.bn_eps, axis_name=self.bn_axis_name, dropout_rate=dropout_rate,
                              drop_connect_rate=drop_connect_rate, rng=rng,
                              drop_connect_only_last_two_stages=self.drop_connect_only_last_two_stages,
                              skip_inactive=self.skip_inactive, remat=self.remat, block_residuals=self.block_residuals,
                              depthwise_impl=self.depthwise_impl, scan_blocks=self.scan_blocks,
                              bn_group_size=self.bn_group_size, collect_stats=self.is_mutable_collection("batch_stats"))
        if new is not None:
            for k, var in stat_vars.items():
                var.value = new[k]
        return logits


def init_variables(space: SearchSpace | None = None, seed: int = 0, **kw: Any) -> dict:
    """Parameters and BN statistics of a freshly initialised supernet (eval trace, tiny input)."""
    space = get_space(space)
    model = Supernet(space=space, **kw)
    r = min(space.resolutions)
    x = jnp.zeros((1, r, r, space.in_channels), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, space.min_subnet()))(jax.random.PRNGKey(seed))
