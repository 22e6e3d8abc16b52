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

Safety: checkpoints are pickles. `safe_torch_load` reads them with `torch.load` and a restricted
unpickler (`RestrictedUnpickler`) that never imports or calls anything outside a short allow-list
(torch's tensor-rebuild functions and storage types, `collections.OrderedDict`, plain containers).
Custom classes that only carry metadata (the pickled `utils.config.Config` under `args`) become
inert `CheckpointPlaceholder` objects whose construction only stores data; globals that would run
code (`os.system`, `builtins.eval`, `subprocess.*`, `getattr`, ...) raise `UnsafeCheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import io
import os
import pickle
import re
import tarfile
import types
import warnings
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np

from alphanet_jax import errors
from alphanet_jax.errors import CheckpointError  # a checkpoint file that cannot be read or used
from alphanet_jax.search_space import SearchSpace, get_space

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointPlaceholder",
    "RestrictedUnpickler",
    "TensorSpec",
    "UnsafeCheckpointError",
    "load_pytorch_checkpoint",
    "pytorch_state_dict_shapes",
    "safe_torch_load",
    "state_dict_to_variables",
    "tensor_specs",
    "to_pytorch_state_dict",
]

TORCH_INSTALL_HINT = "pip install torch==2.13.0  (the CPU build is enough)"
# Each reference DynamicBatchNorm2d owns this many unused `bn_tracking` BatchNorm2d (spec §2.7).
NUM_BN_TRACKING = 2
# Entries of the checkpoint dict that may hold the model weights, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema")


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle names a global that could execute code; nothing was executed."""


class CheckpointMismatchError(CheckpointError):
    """The state dict does not fit the search space: missing, mis-shaped or unexpected tensors."""


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


# ============================================================================
# Restricted unpickling
# ============================================================================


class CheckpointPlaceholder:
    """An inert stand-in for a class the checkpoint names but that is never imported.

    Used for metadata such as the pickled `utils.config.Config` under `args`. Building one only
    stores the data the pickle hands over: constructor arguments (`args`, `kwargs`), the BUILD
    state (`state`), dict items (`items`) and list items (`list_items`). No code of the original
    class runs. `module` / `name` tell which global it replaces.
    """

    module: str = ""
    name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "CheckpointPlaceholder":
        obj = object.__new__(cls)
        d = object.__getattribute__(obj, "__dict__")
        d.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ already stored the arguments

    def __setstate__(self, state: Any) -> None:
        # AttrDict-style objects pickle themselves as their own state (`self.__dict__ = self`).
        self.__dict__["state"] = None if state is self else state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["list_items"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["list_items"].extend(values)

    def to_dict(self) -> dict[str, Any]:
        """The stored data as plain dicts (nested placeholders converted too)."""
        def conv(x: Any) -> Any:
            if isinstance(x, CheckpointPlaceholder):
                return x.to_dict()
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(conv(v) for v in x)
            return x
        d = self.__dict__
        out: dict[str, Any] = {}
        if isinstance(d["state"], dict):
            out.update(conv(d["state"]))
        out.update(conv(d["items"]))
        if not out and (d["args"] or d["list_items"]):
            return {"__class__": f"{self.module}.{self.name}", "args": conv(list(d["args"])),
                    "list_items": conv(d["list_items"])}
        return out

    def __repr__(self) -> str:
        d = self.__dict__
        n = len(d["items"]) + (len(d["state"]) if isinstance(d["state"], dict) else 0)
        return f"<placeholder for {self.module}.{self.name}: {n} fields>"


# Modules whose globals are refused outright (they can run code, touch files, or reach the
# interpreter), by root package name. Anything from `builtins` and `torch` that is not on the
# allow-lists below is refused too.
_FORBIDDEN_ROOTS = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "importlib",
    "imp", "runpy", "shutil", "socket", "pickle", "_pickle", "cPickle", "pickletools", "dill", "cloudpickle",
    "joblib", "marshal", "types", "functools", "operator", "_operator", "codecs", "_codecs", "io", "_io",
    "ctypes", "_ctypes", "code", "codeop", "pty", "commands", "webbrowser", "multiprocessing", "threading",
    "_thread", "signal", "pathlib", "tempfile", "asyncio", "pdb", "bdb", "inspect", "platform", "gc",
    "copyreg", "copy_reg", "copy", "timeit", "trace", "profile", "cProfile", "linecache", "zipimport",
    "pkgutil", "sysconfig", "site", "distutils", "setuptools", "pip", "http", "urllib", "urllib2", "ftplib",
    "smtplib", "telnetlib", "requests", "glob", "fileinput", "tarfile", "zipfile", "sqlite3", "yaml",
    "_posixsubprocess", "select", "selectors", "mmap", "resource", "fcntl", "termios", "logging", "atexit",
    "jax", "jaxlib", "flax", "numpy.distutils", "numpy.f2py", "numpy.testing", "torch", "sympy", "IPython",
})


def _forbidden_module(module: str) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:i]) in _FORBIDDEN_ROOTS for i in range(1, len(parts) + 1))


_ALLOWED_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "bytearray", "complex"})
_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "ascii", "utf-8", "utf8"})


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: text codecs on str only."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _TEXT_CODECS \
            or errors != "strict":
        raise UnsafeCheckpointError(f"refused _codecs.encode({type(obj).__name__}, {encoding!r}, {errors!r})")
    return obj.encode(encoding)


def _torch_allowed() -> dict[tuple[str, str], Any]:
    import torch

    def is_storage(x: Any) -> bool:
        return isinstance(x, (torch.storage.TypedStorage, torch.UntypedStorage))

    def check_hooks(hooks: Any, what: str) -> None:
        if hooks is not None and not (isinstance(hooks, dict) and not hooks):
            raise UnsafeCheckpointError(f"refused {what}: the tensor carries backward hooks")

    def ints(xs: Any) -> bool:
        return isinstance(xs, (tuple, list, torch.Size)) and all(type(x) is int and x >= 0 for x in xs)

    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                          metadata=None):
        if not is_storage(storage) or type(storage_offset) is not int or not ints(size) or not ints(stride):
            raise UnsafeCheckpointError("refused torch._utils._rebuild_tensor_v2 with malformed arguments")
        check_hooks(backward_hooks, "torch._utils._rebuild_tensor_v2")
        if metadata is not None and not isinstance(metadata, dict):
            raise UnsafeCheckpointError("refused torch._utils._rebuild_tensor_v2 with malformed metadata")
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                               bool(requires_grad), collections.OrderedDict(), metadata)

    def rebuild_tensor(storage, storage_offset, size, stride):
        if not is_storage(storage) or type(storage_offset) is not int or not ints(size) or not ints(stride):
            raise UnsafeCheckpointError("refused torch._utils._rebuild_tensor with malformed arguments")
        return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))

    def rebuild_parameter(data, requires_grad, backward_hooks):
        if not isinstance(data, torch.Tensor):
            raise UnsafeCheckpointError("refused torch._utils._rebuild_parameter of a non-tensor")
        check_hooks(backward_hooks, "torch._utils._rebuild_parameter")
        return torch.nn.Parameter(data, bool(requires_grad))

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch", "device"): torch.device,
        ("torch", "Size"): torch.Size,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
    }
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            allowed[("torch", name)] = obj
        elif name.endswith("Storage") and isinstance(obj, type) and issubclass(obj, torch.storage._LegacyStorage):
            allowed[("torch", name)] = obj          # legacy typed storage classes (torch.FloatStorage, ...)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (see the module docstring).

    * real objects: `collections.OrderedDict`; `builtins` set, frozenset, list, dict, tuple, bytearray,
      complex; `_codecs.encode` for text codecs only (protocol-2 bytes); and, when torch is
      importable, checked wrappers of `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` /
      `_rebuild_parameter`, torch storage types, dtypes, `torch.device` and `torch.Size`;
    * `UnsafeCheckpointError`: every other global of builtins, torch and modules that can run code
      (os, posix, subprocess, sys, importlib, pickle, functools, operator, types, ...), any name that
      does not look like a class (a lower-case function name outside numpy), and persistent ids other
      than torch storages;
    * an inert `CheckpointPlaceholder` subclass for any other class name (a custom config class such as
      `utils.config.Config`, numpy scalars in metadata): nothing is imported and no code of it runs.
    """

    _torch_table: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        self._placeholders: dict[tuple[str, str], type] = {}

    @classmethod
    def _torch_globals(cls) -> dict[tuple[str, str], Any]:
        if RestrictedUnpickler._torch_table is None:
            try:
                RestrictedUnpickler._torch_table = _torch_allowed()
            except ImportError:
                return {}  # without torch no tensor can be rebuilt; not cached (torch may appear later)
        return RestrictedUnpickler._torch_table

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError(f"refused a global with a non-string name: {module!r}.{name!r}")
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "_codecs" and name == "encode":
            return _safe_codecs_encode
        torch_obj = self._torch_globals().get((module, name))
        if torch_obj is not None:
            return torch_obj
        if _forbidden_module(module) or "__" in name:
            raise UnsafeCheckpointError(
                f"refused to load global {full!r}: a checkpoint may only reference tensors, plain "
                f"containers and inert metadata classes; {full!r} could execute code, so nothing was loaded")
        if module.split(".")[0] != "numpy" and not all(part[:1].isupper() for part in name.split(".")):
            raise UnsafeCheckpointError(
                f"refused to load global {full!r}: it is not a class name (a function reference in a pickle "
                f"is a call), and only inert metadata classes are replaced by placeholders")
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = type(name, (CheckpointPlaceholder,),
                                           {"module": module, "name": name, "__module__": __name__})
        return self._placeholders[key]

    def load(self) -> Any:
        inner = getattr(self, "persistent_load", None)
        if inner is not None and not getattr(inner, "_restricted", False):
            def guarded(pid: Any) -> Any:
                if not (isinstance(pid, tuple) and len(pid) >= 2 and pid[0] in ("storage", b"storage")
                        and _is_torch_storage_type(pid[1])):
                    kind = pid[0] if isinstance(pid, tuple) and pid else pid
                    raise UnsafeCheckpointError(f"refused persistent id {kind!r}: only torch storages are "
                                                f"allowed (pickled modules are not loaded)")
                return inner(pid)
            guarded._restricted = True  # type: ignore[attr-defined]
            self.persistent_load = guarded
        return super().load()


def _is_torch_storage_type(x: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if isinstance(x, torch.serialization.StorageType):
        return True
    return isinstance(x, type) and issubclass(x, (torch.UntypedStorage, torch.storage._LegacyStorage))


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# What `torch.load(pickle_module=...)` needs: `Unpickler`, `load` (legacy header pickles) and a name.
restricted_pickle = types.ModuleType("alphanet_jax.convert.restricted_pickle",
                                     "pickle with RestrictedUnpickler (for torch.load(pickle_module=...))")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load          # type: ignore[attr-defined]
restricted_pickle.loads = _restricted_loads        # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


# ============================================================================
# Reading checkpoint files
# ============================================================================


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise errors.MissingDependencyError(f"reading PyTorch checkpoints needs PyTorch, an optional dependency "
                                            f"of alphanet-jax: {TORCH_INSTALL_HINT}") from e
    return torch


def _sniff(path: str) -> str:
    """'zip' or 'legacy'; raises CheckpointError for missing, empty, truncated or foreign files."""
    if not os.path.exists(path):
        raise errors.PathNotFoundError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint path {path!r} is not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        raise CheckpointError(f"checkpoint file {path!r} is empty")
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"checkpoint file {path!r} is a damaged zip archive (truncated or corrupt?): "
                                  f"{e}") from None
        if bad is not None:
            raise CheckpointError(f"checkpoint file {path!r} is corrupt: zip member {bad!r} fails its CRC check")
        if any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names):
            raise UnsafeCheckpointError(f"checkpoint file {path!r} is a TorchScript archive (it holds code); "
                                        f"only state-dict checkpoints are loaded")
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"checkpoint file {path!r} is a zip archive without data.pkl: not a "
                                  f"torch.save checkpoint")
        return "zip"
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"checkpoint file {path!r} uses PyTorch's pre-1.0 tar format, which is not "
                              f"supported; re-save it with a recent torch.save")
    return "legacy"


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` of a checkpoint file on CPU through `RestrictedUnpickler` (never executes file code).

    Handles the zip format and the legacy (non-zip) serialization the reference's `save_checkpoint`
    writes. Custom metadata classes come back as `CheckpointPlaceholder`s.
    Raises `UnsafeCheckpointError` for a pickle that references code, `CheckpointError` (a ValueError)
    for an empty, truncated or corrupt file, FileNotFoundError for a missing one, and ImportError (with
    the install command) without torch.
    """
    path = os.fspath(path)
    torch = _import_torch()
    fmt = _sniff(path)
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise CheckpointError(f"cannot read {path!r} while TORCH_FORCE_WEIGHTS_ONLY_LOAD is set: torch then refuses "
                              f"a custom (restricted) unpickler, and its own weights-only loader refuses the "
                              f"pickled config object of the official checkpoints; unset the variable")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # torch / pickle report damage with many exception types
        if isinstance(e.__cause__, UnsafeCheckpointError):
            raise e.__cause__ from None
        raise CheckpointError(f"could not read PyTorch checkpoint {path!r} ({fmt} format): the file is "
                              f"truncated or corrupt, or not a torch.save file ({type(e).__name__}: {e})") from e


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
