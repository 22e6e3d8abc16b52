"""Reading `torch.save` checkpoint files without running code from them (one place to audit).

    obj = safe_torch_load("alphanet_pretrained.pth.tar")   # the whole checkpoint dict, on CPU

Checkpoints are pickles, and unpickling an arbitrary pickle runs arbitrary code. `safe_torch_load`
reads them with `torch.load` and a restricted unpickler (`RestrictedUnpickler`) that never imports
or calls anything outside a short allow-list (torch's tensor-rebuild functions and storage types,
`collections.OrderedDict`, plain containers). Custom classes that only carry metadata (the pickled
`utils.config.Config` under `args` of the official AlphaNet checkpoints) become inert
`CheckpointPlaceholder` objects whose construction only stores data; globals that would run code
(`os.system`, `builtins.eval`, `subprocess.*`, `getattr`, ...) raise `UnsafeCheckpointError`, and so
do TorchScript archives and pickled modules. Empty, truncated or corrupt files raise `CheckpointError`.

This module knows nothing of the supernet: `convert` maps the loaded state dict to Flax variables.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import tarfile
import types
import warnings
import zipfile
from typing import Any

from alphanet_jax import errors
from alphanet_jax.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "CheckpointPlaceholder",
    "RestrictedUnpickler",
    "TORCH_INSTALL_HINT",
    "restricted_pickle",
    "safe_torch_load",
]

TORCH_INSTALL_HINT = "pip install torch==2.13.0  (the CPU build is enough)"


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
restricted_pickle = types.ModuleType("alphanet_jax.safe_pickle.restricted_pickle",
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
