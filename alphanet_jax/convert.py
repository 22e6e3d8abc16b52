"""Official AlphaNet / AttentiveNAS PyTorch supernet checkpoints <-> Flax variables (spec §10).

    variables = load_pytorch_checkpoint("alphanet_pretrained.pth.tar")          # AlphaNet space
    variables = load_pytorch_checkpoint(path, space="tiny")                     # any SearchSpace
    state_dict = to_pytorch_state_dict(variables, space)                        # the reverse

`variables` is `{'params': ..., 'batch_stats': ...}` with exactly the tree and
shapes of `supernet.init_variables(space)` (float32 numpy arrays), ready for
`Supernet(space=space).apply(variables, images, subnet)`.

The name table is derived from `space.blocks` (the search space is the one
source of truth; no stage list is written here). Official names (spec §10.2,
without the DDP `module.` prefix):

    first_conv.conv.conv.weight              [C,3,3,3]       -> params/stem/kernel         [3,3,3,C]
    first_conv.bn.bn.{weight,bias}           [C]             -> params/stem_bn/{scale,bias}
    first_conv.bn.bn.{running_mean,running_var}              -> batch_stats/stem_bn/{mean,var}
    blocks.i.mobile_inverted_conv.
        inverted_bottleneck.conv.conv.weight [mid,in,1,1]    -> block{i}/expand/kernel     [in,mid]
        inverted_bottleneck.bn.bn.*                          -> block{i}/expand_bn
        depth_conv.conv.conv.weight          [mid,1,k,k]     -> block{i}/dw/kernel         [k,k,1,mid]
        depth_conv.bn.bn.*                                   -> block{i}/dw_bn
        depth_conv.se.fc.reduce.{weight,bias} [m,mid,1,1],[m] -> block{i}/se_reduce/{kernel [mid,m], bias}
        depth_conv.se.fc.expand.{weight,bias} [mid,m,1,1],[mid] -> block{i}/se_expand/{kernel [m,mid], bias}
        point_linear.conv.conv.weight        [out,mid,1,1]   -> block{i}/project/kernel    [mid,out]
        point_linear.bn.bn.*                                 -> block{i}/project_bn
    blocks.i.shortcut.conv.conv.weight       [out,in,1,1]    -> block{i}/shortcut/kernel   [in,out]
    last_conv.final_expand_layer.conv.conv.weight [E,w7,1,1] -> head/expand/kernel         [w7,E]
    last_conv.final_expand_layer.bn.bn.*                     -> head/expand_bn
    last_conv.feature_mix_layer.conv.conv.weight [W,E,1,1]   -> head/feature_mix/kernel    [E,W]
    classifier.linear.linear.{weight,bias}   [K,W],[K]       -> classifier/{kernel [W,K], bias}

Every BN also has `….bn.num_batches_tracked` and two unused `….bn_tracking.{0,1}.*` buffer
sets: they are ignored on load and written (as their initial values) by `to_pytorch_state_dict`,
which gives the official 1468 entries for AlphaNet.

Safety: checkpoints are pickles; `safe_pickle.safe_torch_load` reads them without running their code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from alphanet_jax import errors
from alphanet_jax.search_space import SearchSpace, get_space
# The error types live in `errors` and the safe loader in `safe_pickle`; they are re-exported here
# because the README documents them as `convert.*`.
from alphanet_jax.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError
from alphanet_jax.safe_pickle import (CheckpointPlaceholder, RestrictedUnpickler,
                                      restricted_pickle, safe_torch_load)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointPlaceholder",
    "RestrictedUnpickler",
    "TensorSpec",
    "UnsafeCheckpointError",
    "load_pytorch_checkpoint",
    "pytorch_state_dict_shapes",
    "restricted_pickle",
    "safe_torch_load",
    "state_dict_to_variables",
    "tensor_specs",
    "to_pytorch_state_dict",
]

# Each reference DynamicBatchNorm2d owns this many unused `bn_tracking` BatchNorm2d (spec §2.7).
NUM_BN_TRACKING = 2
# Entries of the checkpoint dict that may hold the model weights, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema")


# ============================================================================
# Name / shape table (derived from the search space)
# ============================================================================


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor or BN statistic of the official state dict and its Flax leaf."""

    key: str                      # official name without the `module.` prefix
    collection: str               # 'params' or 'batch_stats'
    path: tuple[str, ...]         # path inside the collection
    kind: str                     # 'conv' (OIHW <-> HWIO), 'pointwise', 'linear' or 'vector'
    torch_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        s = self.torch_shape
        if self.kind == "conv":            # [O,I,kh,kw] -> [kh,kw,I,O] (depthwise: [C,1,k,k] -> [k,k,1,C])
            return (s[2], s[3], s[1], s[0])
        if self.kind == "pointwise":       # [O,I,1,1] -> [I,O]
            return (s[1], s[0])
        if self.kind == "linear":          # [O,I] -> [I,O]
            return (s[1], s[0])
        return s

    @property
    def trainable(self) -> bool:
        return self.collection == "params"

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            w = w.transpose(2, 3, 1, 0)
        elif self.kind == "pointwise":
            w = w[:, :, 0, 0].T
        elif self.kind == "linear":
            w = w.T
        return np.ascontiguousarray(w, dtype=np.float32)

    def to_torch(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            w = w.transpose(3, 2, 0, 1)
        elif self.kind == "pointwise":
            w = w.T[:, :, None, None]
        elif self.kind == "linear":
            w = w.T
        return np.ascontiguousarray(w, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class _Buffer:
    """An untrained buffer of the official state dict (num_batches_tracked, bn_tracking.*)."""

    key: str
    shape: tuple[int, ...]
    fill: float
    dtype: Any


def _bn(prefix: str, path: tuple[str, ...], c: int) -> Iterator[TensorSpec | _Buffer]:
    """The 11 entries of one reference DynamicBatchNorm2d at `prefix` (spec §10.2)."""
    p = f"{prefix}.bn"
    yield TensorSpec(f"{p}.weight", "params", path + ("scale",), "vector", (c,))
    yield TensorSpec(f"{p}.bias", "params", path + ("bias",), "vector", (c,))
    yield TensorSpec(f"{p}.running_mean", "batch_stats", path + ("mean",), "vector", (c,))
    yield TensorSpec(f"{p}.running_var", "batch_stats", path + ("var",), "vector", (c,))
    yield _Buffer(f"{p}.num_batches_tracked", (), 0, np.int64)
    for j in range(NUM_BN_TRACKING):
        t = f"{prefix}.bn_tracking.{j}"
        yield _Buffer(f"{t}.running_mean", (c,), 0.0, np.float32)
        yield _Buffer(f"{t}.running_var", (c,), 1.0, np.float32)
        yield _Buffer(f"{t}.num_batches_tracked", (), 0, np.int64)


def _entries(space: SearchSpace) -> list[TensorSpec | _Buffer]:
    """Every official state-dict entry in the reference's registration order."""
    if space.head_kind != "v3" or space.shortcut != "always":
        raise errors.ConfigError(f"search space {space.name!r} ({space.head_kind!r} head, shortcut "
                                 f"{space.shortcut!r}) has no AttentiveNAS/AlphaNet PyTorch checkpoint format: the "
                                 f"converter covers spaces with a 'v3' head and 'always' shortcuts")
    out: list[TensorSpec | _Buffer] = []
    c0, k0 = max(space.stem_widths), space.stem_kernel
    out.append(TensorSpec("first_conv.conv.conv.weight", "params", ("stem", "kernel"), "conv",
                          (c0, space.in_channels, k0, k0)))
    out.extend(_bn("first_conv.bn", ("stem_bn",), c0))
    for b in space.blocks:
        blk = f"block{b.index}"
        m = f"blocks.{b.index}.mobile_inverted_conv"
        if b.has_expand:
            out.append(TensorSpec(f"{m}.inverted_bottleneck.conv.conv.weight", "params", (blk, "expand", "kernel"),
                                  "pointwise", (b.max_mid, b.max_in, 1, 1)))
            out.extend(_bn(f"{m}.inverted_bottleneck.bn", (blk, "expand_bn"), b.max_mid))
        k = b.max_kernel
        out.append(TensorSpec(f"{m}.depth_conv.conv.conv.weight", "params", (blk, "dw", "kernel"), "conv",
                              (b.max_mid, 1, k, k)))
        out.extend(_bn(f"{m}.depth_conv.bn", (blk, "dw_bn"), b.max_mid))
        if b.se:
            se = f"{m}.depth_conv.se.fc"
            out.append(TensorSpec(f"{se}.reduce.weight", "params", (blk, "se_reduce", "kernel"), "pointwise",
                                  (b.max_se, b.max_mid, 1, 1)))
            out.append(TensorSpec(f"{se}.reduce.bias", "params", (blk, "se_reduce", "bias"), "vector",
                                  (b.max_se,)))
            out.append(TensorSpec(f"{se}.expand.weight", "params", (blk, "se_expand", "kernel"), "pointwise",
                                  (b.max_mid, b.max_se, 1, 1)))
            out.append(TensorSpec(f"{se}.expand.bias", "params", (blk, "se_expand", "bias"), "vector",
                                  (b.max_mid,)))
        out.append(TensorSpec(f"{m}.point_linear.conv.conv.weight", "params", (blk, "project", "kernel"),
                              "pointwise", (b.max_out, b.max_mid, 1, 1)))
        out.extend(_bn(f"{m}.point_linear.bn", (blk, "project_bn"), b.max_out))
        out.append(TensorSpec(f"blocks.{b.index}.shortcut.conv.conv.weight", "params", (blk, "shortcut", "kernel"),
                              "pointwise", (b.max_out, b.max_in, 1, 1)))
    last = space.blocks[-1].max_out
    he, hw = space.head_max_expand, max(space.head_widths)
    out.append(TensorSpec("last_conv.final_expand_layer.conv.conv.weight", "params", ("head", "expand", "kernel"),
                          "pointwise", (he, last, 1, 1)))
    out.extend(_bn("last_conv.final_expand_layer.bn", ("head", "expand_bn"), he))
    out.append(TensorSpec("last_conv.feature_mix_layer.conv.conv.weight", "params",
                          ("head", "feature_mix", "kernel"), "pointwise", (hw, he, 1, 1)))
    out.append(TensorSpec("classifier.linear.linear.weight", "params", ("classifier", "kernel"), "linear",
                          (space.num_classes, hw)))
    out.append(TensorSpec("classifier.linear.linear.bias", "params", ("classifier", "bias"), "vector",
                          (space.num_classes,)))
    return out


def tensor_specs(space: SearchSpace | Mapping | str | None = None) -> list[TensorSpec]:
    """The tensors that carry weights or BN statistics (no buffers), in registration order."""
    return [e for e in _entries(get_space(space)) if isinstance(e, TensorSpec)]


def pytorch_state_dict_shapes(space: SearchSpace | Mapping | str | None = None,
                              prefix: str = "module.") -> dict[str, tuple[int, ...]]:
    """Every official state-dict name (buffers included) and its PyTorch shape."""
    return {prefix + e.key: (e.torch_shape if isinstance(e, TensorSpec) else e.shape)
            for e in _entries(get_space(space))}


def _is_ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked") or ".bn_tracking." in key


# ============================================================================
# Flax variables <-> state dict
# ============================================================================


def to_pytorch_state_dict(variables: Mapping[str, Any], space: SearchSpace | Mapping | str | None = None,
                          prefix: str = "module.") -> dict[str, np.ndarray]:
    """The official (DDP, `module.`-prefixed) supernet state dict of Flax `variables`, as numpy arrays.

    Includes the `num_batches_tracked` and `bn_tracking.*` buffers at their initial values
    (0, zeros, ones), so the entry count matches the reference (1468 for AlphaNet).
    Use `{k: torch.from_numpy(v) for k, v in ...items()}` for `torch.save` / `load_state_dict`.
    """
    space = get_space(space)
    out: dict[str, np.ndarray] = {}
    for e in _entries(space):
        if isinstance(e, _Buffer):
            out[prefix + e.key] = np.full(e.shape, e.fill, dtype=e.dtype)
            continue
        node: Any = variables
        where = e.collection
        try:
            node = node[e.collection]
            for p in e.path:
                where += "/" + p
                node = node[p]
        except (KeyError, TypeError, IndexError):
            raise CheckpointMismatchError(
                f"variables have no leaf {where!r} (needed for {e.key!r}); they do not come from "
                f"supernet.init_variables(space) for space {space.name!r}") from None
        w = np.asarray(node, dtype=np.float32)
        if w.shape != e.flax_shape:
            raise CheckpointMismatchError(
                f"variable {where!r} has shape {list(w.shape)}, space {space.name!r} expects "
                f"{list(e.flax_shape)} (for {e.key!r})")
        out[prefix + e.key] = e.to_torch(w)
    return out


def state_dict_to_variables(state_dict: Mapping[str, Any], space: SearchSpace | Mapping | str | None = None,
                            *, strict: bool = True, source: str = "state dict") -> dict[str, dict]:
    """Maps an official supernet state dict (torch tensors or numpy arrays) to Flax variables.

    The `module.` prefix is optional; `num_batches_tracked` and `bn_tracking.*` entries are ignored.
    Missing or mis-shaped tensors raise `CheckpointMismatchError` naming the key and both shapes;
    so do unexpected extra keys unless `strict=False`.
    """
    space = get_space(space)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a mapping of tensor names to tensors, "
                              f"got {type(state_dict).__name__}")
    sd: dict[str, Any] = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: state-dict key {k!r} is not a string")
        name = k[len("module."):] if k.startswith("module.") else k
        if name in sd:
            raise CheckpointError(f"{source}: key {name!r} appears both with and without the 'module.' prefix")
        sd[name] = v

    specs = tensor_specs(space)
    known = {e.key for e in specs}
    missing: list[str] = []
    misshaped: list[str] = []
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for e in specs:
        if e.key not in sd:
            missing.append(e.key)
            continue
        w = _to_numpy(sd[e.key], e.key, source)
        if tuple(w.shape) != e.torch_shape:
            misshaped.append(f"{e.key}: checkpoint {list(w.shape)} vs expected {list(e.torch_shape)}")
            continue
        node = variables[e.collection]
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = e.to_flax(w)
    unexpected = [k for k in sd if k not in known and not _is_ignored(k)]
    if missing or misshaped or (unexpected and strict):
        raise CheckpointMismatchError(_mismatch_message(source, space, sd, missing, misshaped,
                                                        unexpected if strict else []))
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} unexpected entries (strict=False): "
                      f"{_few(unexpected)}", stacklevel=2)
    return variables


def _to_numpy(v: Any, key: str, source: str) -> np.ndarray:
    if hasattr(v, "detach") and hasattr(v, "is_floating_point"):          # a torch tensor
        t = v.detach().cpu()
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: entry {key!r} holds {t.dtype} values, expected floating point")
        return t.float().numpy()
    if isinstance(v, np.ndarray) or hasattr(v, "__array__"):
        a = np.asarray(v)
        if a.dtype.kind != "f":
            raise CheckpointError(f"{source}: entry {key!r} holds {a.dtype} values, expected floating point")
        return a.astype(np.float32, copy=False)
    raise CheckpointError(f"{source}: entry {key!r} is a {type(v).__module__}.{type(v).__qualname__}, "
                          f"not a tensor")


def _few(xs: list[str], n: int = 8) -> str:
    head = ", ".join(repr(x) for x in xs[:n])
    return head + (f", ... ({len(xs) - n} more)" if len(xs) > n else "")


def _mismatch_message(source: str, space: SearchSpace, sd: Mapping[str, Any], missing: list[str],
                      misshaped: list[str], unexpected: list[str]) -> str:
    parts = [f"{source} does not match search space {space.name!r}:"]
    if misshaped:
        parts.append(f"{len(misshaped)} tensor(s) have the wrong shape: " + "; ".join(misshaped[:8])
                     + (f"; ... ({len(misshaped) - 8} more)" if len(misshaped) > 8 else ""))
    if missing:
        parts.append(f"{len(missing)} tensor(s) are missing: {_few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected entries (pass strict=False to ignore them): {_few(unexpected)}")
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    n_ckpt = max(idx) + 1 if idx else 0
    if misshaped or n_ckpt != space.num_blocks:
        parts.append(f"(the checkpoint has {n_ckpt} blocks, space {space.name!r} has {space.num_blocks}; "
                     f"a checkpoint from a different search space or model does not load: pass the space "
                     f"it was trained with)")
    return "\n  ".join(parts)


def _select_state_dict(obj: Any, path: str, key: str | None) -> tuple[Mapping[str, Any], str]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict with a state dict")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"checkpoint {path!r} has no entry {key!r}; top-level keys: {sorted(map(str, obj))}")
        sd = obj[key]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"checkpoint {path!r}: entry {key!r} is a {type(sd).__name__}, not a state dict")
        return sd, key
    for k in STATE_DICT_KEYS:
        if k in obj and isinstance(obj[k], Mapping):
            if k != "state_dict":
                warnings.warn(f"checkpoint {path!r} has no 'state_dict' entry; using its {k!r} entry"
                              + (" (EMA weights)" if k == "state_dict_ema" else ""), stacklevel=3)
            return obj[k], k
    if obj and all(isinstance(k, str) for k in obj) and any(k.endswith(".weight") for k in obj):
        return obj, "<bare state dict>"
    raise CheckpointError(f"checkpoint {path!r} holds no state dict: expected one of the entries "
                          f"{list(STATE_DICT_KEYS)} or a bare state dict; top-level keys: "
                          f"{sorted(map(str, obj))[:20]}")


def load_pytorch_checkpoint(path: str | os.PathLike, space: SearchSpace | Mapping | str | None = None, *,
                            strict: bool = True, key: str | None = None) -> dict[str, dict]:
    """Flax variables (`params`, `batch_stats`) of an official AlphaNet/AttentiveNAS supernet checkpoint.

    `path`: a `torch.save` file, legacy or zip format, holding a dict with `state_dict` (the
    reference's `save_checkpoint`), or `model` / `state_dict_ema` (used with a warning), or a bare
    state dict. `key` forces the entry to use. `space`: the search space the supernet was built
    from (default AlphaNet). `strict=False` ignores unexpected extra tensors (the reference's own
    loader ignores them too); missing or mis-shaped tensors are always errors.
    The result has exactly the tree and shapes of `supernet.init_variables(space)`, float32 numpy.
    Loading never runs code from the file (see `safe_torch_load`).
    """
    path = os.fspath(path)
    obj = safe_torch_load(path)
    sd, used = _select_state_dict(obj, path, key)
    for k, v in sd.items():
        if isinstance(v, CheckpointPlaceholder):
            raise CheckpointError(f"checkpoint {path!r}: state-dict entry {k!r} is an object of an unknown class "
                                  f"{v.module}.{v.name}, not a tensor")
    return state_dict_to_variables(sd, space, strict=strict, source=f"checkpoint {path!r} [{used}]")
