"""Latency on the current device: the parts of a subnet, their timers and the per-part table (`--mode=latency`).

A subnet is cut into parts: the stem, each active block, the head (with the classifier). A part's
key names everything its time depends on (`subnet_parts`): for a block its input size, channels
in/mid/out, kernel, stride, SE width, activation and shortcut kind, so one entry serves every
subnet that has that block, and a table is reusable across runs and searches. `build_table` times
every part that occurs in the space (`space_parts`: each stage's blocks at every width, expand,
kernel and resolution choice, found by resolving subnets with `search_space.resolve`, no second
stage list), on the current JAX backend (jit, warm-up, median of repeats, `block_until_ready`),
minus the measured cost of dispatching an empty program. The predictor fitted to whole subnets and its
validation are `latency_fit`.

Timings are wall-clock medians on whatever else the machine runs: on a shared machine they are
noisy, and a table says where and how it was measured (`backend`, `device_kind`, `host`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alphanet_jax import export as export_lib
from alphanet_jax import latency
from alphanet_jax import layers
from alphanet_jax.errors import MissingDependencyError, UserError
from alphanet_jax.resolve import resolve
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

RUNTIMES = ("xla", "onnxruntime")
TABLE_FILE = "table.json"
DTYPE = "float32"  # what the timers run


def host() -> str:
    return platform.node()


def space_id(space: SearchSpace) -> str:
    """The space's name and a digest of its definition: a table of an edited space does not load."""
    digest = hashlib.sha256(json.dumps(space.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return f"{space.name}-{digest}"


@dataclasses.dataclass(frozen=True)
class Part:
    """One timed piece of a subnet: its table key, kind (stem, block, head), input width and shape."""

    key: str
    kind: str
    width: int
    channels: tuple[int, ...]   # stem: (in, out); head: (in, expand, width); block: ()
    block: Any = None           # the search_space.ActiveBlock of a block


def subnet_parts(subnet: SubnetConfig, space: SearchSpace | None = None) -> list[Part]:
    """The subnet's parts in order, with their keys."""
    space = get_space(space)
    rs = resolve(subnet, space)
    w = rs.resolution
    parts = [Part(f"stem r{w} {space.in_channels}-{rs.stem_width} k{space.stem_kernel} s{space.stem_stride} "
                  f"{space.act}", "stem", w, (space.in_channels, rs.stem_width))]
    w = export_lib.conv_out_size(w, space.stem_kernel, space.stem_stride)
    for b in rs.blocks:
        key = (f"block r{w} {b.in_ch}-{b.mid}-{b.out_ch} k{b.kernel} s{b.stride} se{b.se_mid} "
               f"{'expand' if b.has_expand else 'noexpand'} {b.act} {b.shortcut}")
        parts.append(Part(key, "block", w, (), b))
        w = export_lib.conv_out_size(w, b.kernel, b.stride)
    c = rs.blocks[-1].out_ch if rs.blocks else rs.stem_width
    parts.append(Part(f"head r{w} {c}-{rs.head_expand}-{rs.head_width} {space.head_kind} {space.act} "
                      f"classes{space.num_classes}", "head", w, (c, rs.head_expand, rs.head_width)))
    return parts


def _covering_subnets(space: SearchSpace):
    """Subnets that together hold every part of the space: per resolution and stage, each choice of the
    stage's input and output width (and the head's width after the last stage), kernel and expand
    ratio, every stage at full depth (a stage's later blocks all have one shape)."""
    depth = [max(c) for c in space.choices("depth")]
    kernels, expands = space.choices("kernel_size"), space.choices("expand_ratio")
    nw = len(space.width_choices)
    for r in space.resolutions:
        for si in range(space.num_stages):
            if space.width_multipliers:  # width-tied: one width list per multiplier
                widths = [list(space.width_subnet(m, r).width) for m in space.width_multipliers]
                mults = list(space.width_multipliers)
            else:
                top = [max(c) for c in space.width_choices]
                pos = [si, si + 1] + ([nw - 1] if si + 2 == nw - 1 else [])
                widths = []
                for combo in _product([space.width_choices[p] for p in pos]):
                    w = list(top)
                    for p, v in zip(pos, combo):
                        w[p] = v
                    widths.append(w)
                mults = [None] * len(widths)
            for w, m in zip(widths, mults):
                for k in kernels[si]:
                    for t in expands[si]:
                        ks = [max(c) for c in kernels]
                        ts = [max(c) for c in expands]
                        ks[si], ts[si] = k, t
                        yield SubnetConfig(resolution=r, width=w, depth=depth, kernel_size=ks, expand_ratio=ts,
                                           width_mult=m)


def _product(lists: Sequence[Sequence[Any]]) -> list[tuple]:
    out: list[tuple] = [()]
    for xs in lists:
        out = [o + (x,) for o in out for x in xs]
    return out


def space_parts(space: SearchSpace | None = None) -> dict[str, Part]:
    """Every part that occurs in the space, by key."""
    space = get_space(space)
    parts: dict[str, Part] = {}
    for s in _covering_subnets(space):
        for p in subnet_parts(s, space):
            parts.setdefault(p.key, p)
    return parts


# ----------------------------------------------------------------------------
# Timing on the current JAX backend
# ----------------------------------------------------------------------------


STATISTICS = {"median": statistics.median, "min": min}  # of each call's samples; on a shared machine,
# other work only adds time: the min is the steadier


def _ready(fn: Callable[[], Any], warmup: int) -> Callable[[], Any]:
    """`fn` after one (compiling) call and `warmup` more."""
    for _ in range(1 + warmup):
        jax.block_until_ready(fn())
    return fn


def measure_calls(calls: Sequence[Callable[[], Any]], repeats: int, rounds: int, statistic: str) -> list[float]:
    """The median (or min) time in ms of each call over `rounds` rounds of `repeats` synchronised runs: the
    rounds go over all calls in turn, so a burst of other work on the machine falls on a few samples of
    many calls rather than on every sample of one."""
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for fn, out in zip(calls, samples):
            for _ in range(repeats):
                t = time.perf_counter()
                jax.block_until_ready(fn())
                out.append(time.perf_counter() - t)
    return [1e3 * STATISTICS[statistic](x) for x in samples]


def _random_like(tree: Any, seed: int) -> Any:
    """Positive random values of the tree's shapes (BN variances stay valid; no zero weights)."""
    rng = np.random.default_rng(seed)  # numpy: no program compiled per shape
    return jax.tree.map(lambda x: jnp.asarray(0.05 + 0.1 * np.abs(rng.standard_normal(x.shape)), jnp.float32),
                        tree)


def part_variables(part: Part, space: SearchSpace, seed: int = 0) -> dict:
    """Random variables of one part in `export.StaticSubnet`'s layout (a block's own, or the stem's or the
    head's and classifier's entries)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    if part.kind == "block":
        module = export_lib._StaticBlock(part.block, 1e-5, jnp.float32)
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, part.width, part.width, part.block.in_ch)), False))
    elif part.kind == "stem":
        (cin, c), k = part.channels, space.stem_kernel
        shapes = {"params": {"stem": {"kernel": f32(k, k, cin, c)}, "stem_bn": {"scale": f32(c), "bias": f32(c)}},
                  "batch_stats": {"stem_bn": {"mean": f32(c), "var": f32(c)}}}
    else:
        c, e, w = part.channels
        head = {"expand": {"kernel": f32(c, e)}, "expand_bn": {"scale": f32(e), "bias": f32(e)}}
        if space.head_kind == "v3":
            head["feature_mix"] = {"kernel": f32(e, w)}
        shapes = {"params": {"head": head, "classifier": {"kernel": f32(w, space.num_classes),
                                                          "bias": f32(space.num_classes)}},
                  "batch_stats": {"head": {"expand_bn": {"mean": f32(e), "var": f32(e)}}}}
    return _random_like(shapes, seed)


def _part_apply(part: Part, space: SearchSpace, eps: float) -> Callable:
    """`fn(variables, x_nhwc)` of one part, as `export.StaticSubnet` runs it (eval mode)."""
    act = layers.activation(space.act)
    if part.kind == "block":
        module = export_lib._StaticBlock(part.block, eps, jnp.float32)
        return lambda v, x: module.apply(v, x, False)
    if part.kind == "stem":
        def stem(v, x):
            P, S = v["params"], v["batch_stats"]
            y = layers.conv2d(x, P["stem"]["kernel"], space.stem_stride)
            return act(export_lib._bn(y, P["stem_bn"], S["stem_bn"], False, eps)[0])
        return stem

    def head(v, x):
        H, HS, C = v["params"]["head"], v["batch_stats"]["head"], v["params"]["classifier"]
        x = act(export_lib._bn(layers.pointwise(x, H["expand"]["kernel"]), H["expand_bn"], HS["expand_bn"], False,
                               eps)[0])
        x = jnp.mean(x, axis=(1, 2))
        if "feature_mix" in H:
            x = act(x @ H["feature_mix"]["kernel"])
        return x @ C["kernel"] + C["bias"]
    return head


def _in_channels(part: Part) -> int:
    return part.block.in_ch if part.kind == "block" else part.channels[0]


class XlaTimer:
    """Times parts and whole subnets with jit on the default JAX backend (float32, eval mode)."""

    runtime = "xla"

    def __init__(self, space: SearchSpace, batch_size: int, warmup: int = 3, repeats: int = 20,
                 bn_eps: float = 1e-5, seed: int = 0, statistic: str = "median", rounds: int = 2):
        from alphanet_jax import supernet  # the supernet's initial weights, sliced per subnet

        self.space, self.batch, self.warmup, self.repeats, self.eps = space, batch_size, warmup, repeats, bn_eps
        self.statistic, self.rounds = statistic, rounds
        self.variables = jax.device_get(supernet.init_variables(space, seed=seed))
        self.dispatch_ms = self._dispatch_ms()

    def _input(self, width: int, channels: int) -> jax.Array:
        rng = np.random.default_rng(1)
        return jnp.asarray(rng.standard_normal((self.batch, width, width, channels)), jnp.float32)

    def _dispatch_ms(self) -> float:
        """The time of launching an (almost) empty program: subtracted from every part."""
        x = jnp.zeros((self.batch, 4), jnp.float32)
        f = jax.jit(lambda x: x[0, 0] + 1.0)
        return self._measure([_ready(lambda: f(x), self.warmup)])[0]

    def _measure(self, calls: Sequence[Callable[[], Any]]) -> list[float]:
        return measure_calls(calls, self.repeats, self.rounds, self.statistic)

    def part_call(self, part: Part) -> Callable[[], Any]:
        """One part on a batch, compiled and warmed up."""
        v, x = part_variables(part, self.space), self._input(part.width, _in_channels(part))
        fn = jax.jit(_part_apply(part, self.space, self.eps))
        return _ready(lambda: fn(v, x), self.warmup)

    def subnet_call(self, subnet: SubnetConfig) -> Callable[[], Any]:
        """End to end: the static subnet (`export.extract_subnet`) on a batch at its resolution."""
        model, v = export_lib.extract_subnet(self.variables, subnet, self.space)
        x = self._input(subnet.resolution, self.space.in_channels)
        fn = jax.jit(lambda v, x: model.apply(v, x))
        return _ready(lambda: fn(v, x), self.warmup)

    def parts_ms(self, parts: Sequence[Part], log: Callable[[str], None] | None = None) -> list[float]:
        """Each part's time minus the dispatch time (all parts prepared first, then timed in rounds)."""
        calls = []
        for i, p in enumerate(parts):
            calls.append(self.part_call(p))
            if log and (i + 1) % 50 == 0:
                log(f"latency: {i + 1}/{len(parts)} parts compiled")
        return [max(t - self.dispatch_ms, 0.0) for t in self._measure(calls)]

    def subnets_ms(self, subnets: Sequence[SubnetConfig]) -> list[float]:
        return self._measure([self.subnet_call(s) for s in subnets])

    def part_ms(self, part: Part) -> float:
        return self.parts_ms([part])[0]

    def subnet_ms(self, subnet: SubnetConfig) -> float:
        return self.subnets_ms([subnet])[0]

    def describe(self) -> dict:
        dev = jax.devices()[0]
        return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "runtime": self.runtime}


class OrtTimer(XlaTimer):
    """Times parts and whole subnets in onnxruntime (CPU provider): the graphs of `onnx_export`, input NCHW."""

    runtime = "onnxruntime"

    def __init__(self, *args: Any, threads: int = 0, **kw: Any):
        self.threads = threads  # onnxruntime's intra-op threads (0: its default, one per core)
        super().__init__(*args, **kw)

    def _session(self, model: Any):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("latency.runtime=onnxruntime needs onnxruntime, an optional dependency: "
                                         "pip install -e .[deploy]") from None
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _call(self, model: Any, width: int, channels: int) -> Callable[[], Any]:
        sess = self._session(model)
        name = sess.get_inputs()[0].name
        x = np.asarray(np.transpose(np.asarray(self._input(width, channels)), (0, 3, 1, 2)), np.float32)
        return _ready(lambda: sess.run(None, {name: x}), self.warmup)

    def _dispatch_ms(self) -> float:
        from alphanet_jax import onnx_export

        onnx = onnx_export._onnx()
        h = onnx.helper
        graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "empty",
                             [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [self.batch, 4, 1, 1])],
                             [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", onnx_export.OPSET)])
        return self._measure([self._call(model, 1, 4)])[0]

    def part_call(self, part: Part) -> Callable[[], Any]:
        from alphanet_jax import onnx_export

        model = onnx_export.part_to_onnx(part.kind, jax.device_get(part_variables(part, self.space)), self.space,
                                         part.width, _in_channels(part), part.block, self.eps)
        return self._call(model, part.width, _in_channels(part))

    def subnet_call(self, subnet: SubnetConfig) -> Callable[[], Any]:
        from alphanet_jax import onnx_export

        model = onnx_export.subnet_to_onnx(self.variables, subnet, self.space, self.eps)
        return self._call(model, subnet.resolution, self.space.in_channels)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": "cpu", "device_kind": f"onnxruntime {ort.__version__} CPUExecutionProvider "
                                                 f"({platform.processor() or platform.machine()})",
                "runtime": self.runtime}


def make_timer(runtime: str, space: SearchSpace, batch_size: int, **kw: Any):
    if runtime not in RUNTIMES:
        raise UserError(f"latency.runtime = {runtime!r} is not known: one of {list(RUNTIMES)}")
    if kw.get("statistic", "median") not in STATISTICS:
        raise UserError(f"latency.statistic = {kw['statistic']!r} is not known: one of {list(STATISTICS)}")
    return (OrtTimer if runtime == "onnxruntime" else XlaTimer)(space, batch_size, **kw)


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------


def build_table(timer: Any, space: SearchSpace, dtype: str = "float32", old: dict | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Times every part of the space (entries of `old`, a table of the same setting, are kept)."""
    parts = space_parts(space)
    entries = dict((old or {}).get("entries", {}))
    todo = [p for k, p in parts.items() if k not in entries]
    log(f"latency: {len(parts)} parts in space {space.name!r}, {len(parts) - len(todo)} already in the table, "
        f"timing {len(todo)} on {timer.describe()['backend']} (batch {timer.batch}, "
        f"{getattr(timer, 'statistic', 'median')} of {timer.repeats})")
    t0 = time.perf_counter()
    for p, ms in zip(todo, timer.parts_ms(todo, log=log)):
        entries[p.key] = round(ms, 6)
    log(f"latency: {len(todo)} parts timed ({time.perf_counter() - t0:.0f} s)")
    table = {"version": latency.TABLE_VERSION, "space_id": space_id(space), **timer.describe(),
             "host": host(), "batch_size": int(timer.batch), "dtype": dtype, "entries": entries,
             "overhead_ms": 0.0, "scale": 1.0, "dispatch_ms": round(timer.dispatch_ms, 6),
             "timing": {"warmup": timer.warmup, "repeats": timer.repeats, "rounds": getattr(timer, "rounds", 1),
                        "statistic": getattr(timer, "statistic", "median")}}
    return table
