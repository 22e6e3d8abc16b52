"""The search space as data: stages, subnet configs, sampling, presets.

Everything else (supernet masks, training sampler, evolutionary search, FLOPs,
export, checkpoint conversion) is driven by a `SearchSpace` built from the plain
dicts below (or from an ml_collections config holding the same fields), so the
stage list is written exactly once. Pure Python: no jax import, it runs inside
search loops.

Semantics follow the AttentiveNAS/AlphaNet reference (spec §1, §3, §4, §5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any, Iterable, Mapping, Sequence

# ----------------------------------------------------------------------------
# Canonical space definitions (spec §1.1). Configs in configs/ embed these.
# ----------------------------------------------------------------------------

ALPHANET_SPACE: dict[str, Any] = dict(
    name="alphanet",
    resolutions=[192, 224, 256, 288],
    in_channels=3,
    num_classes=1000,
    stem=dict(widths=[16, 24], kernel_size=3, stride=2),
    stages=[
        dict(name="mb1", widths=[16, 24], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[1], stride=1, se=False),
        dict(name="mb2", widths=[24, 32], depths=[3, 4, 5], kernel_sizes=[3, 5], expand_ratios=[4, 5, 6], stride=2, se=False),
        dict(name="mb3", widths=[32, 40], depths=[3, 4, 5, 6], kernel_sizes=[3, 5], expand_ratios=[4, 5, 6], stride=2, se=True),
        dict(name="mb4", widths=[64, 72], depths=[3, 4, 5, 6], kernel_sizes=[3, 5], expand_ratios=[4, 5, 6], stride=2, se=False),
        dict(name="mb5", widths=[112, 120, 128], depths=[3, 4, 5, 6, 7, 8], kernel_sizes=[3, 5], expand_ratios=[4, 5, 6], stride=1, se=True),
        dict(name="mb6", widths=[192, 200, 208, 216], depths=[3, 4, 5, 6, 7, 8], kernel_sizes=[3, 5], expand_ratios=[6], stride=2, se=True),
        dict(name="mb7", widths=[216, 224], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[6], stride=1, se=True),
    ],
    head=dict(kind="v3", widths=[1792, 1984], expand_ratio=6),
    act="swish",
    se_reduction=4,
    shortcut="always",
)

# A few-hundred-parameter space for tests and the quickstart (8x8 digits
# upsampled to 24). Same shape rules as AlphaNet, every choice kind present.
TINY_SPACE: dict[str, Any] = dict(
    name="tiny",
    resolutions=[16, 24],
    in_channels=3,
    num_classes=10,
    stem=dict(widths=[8, 16], kernel_size=3, stride=2),
    stages=[
        dict(name="mb1", widths=[8, 16], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[1], stride=1, se=False),
        dict(name="mb2", widths=[16, 24], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[2, 3], stride=2, se=True),
        dict(name="mb3", widths=[24, 32], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[2, 3], stride=2, se=True),
    ],
    head=dict(kind="v3", widths=[48, 64], expand_ratio=2),
    act="swish",
    se_reduction=4,
    shortcut="always",
)

SPACES: dict[str, dict[str, Any]] = {"alphanet": ALPHANET_SPACE, "tiny": TINY_SPACE}

# AlphaNet A0..A6 (spec §5.2, `AlphaNet:configs/eval_alphanet_models.yml`).
# Keys follow the reference: a5 is A5-small, a5_1 is A5-base.
PRESETS: dict[str, dict[str, Any]] = {
    "a0": dict(resolution=192, width=[16, 16, 24, 32, 64, 112, 192, 216, 1792], kernel_size=[3, 3, 3, 3, 3, 3, 3],
               expand_ratio=[1, 4, 4, 4, 4, 6, 6], depth=[1, 3, 3, 3, 3, 3, 1]),
    "a1": dict(resolution=224, width=[16, 16, 24, 32, 64, 112, 192, 216, 1984], kernel_size=[3, 3, 3, 5, 3, 5, 3],
               expand_ratio=[1, 4, 4, 4, 4, 6, 6], depth=[1, 3, 3, 3, 3, 3, 1]),
    "a2": dict(resolution=224, width=[16, 16, 24, 32, 64, 112, 200, 224, 1984], kernel_size=[3, 3, 3, 3, 3, 5, 3],
               expand_ratio=[1, 4, 5, 4, 4, 6, 6], depth=[1, 3, 3, 3, 3, 4, 1]),
    "a3": dict(resolution=224, width=[16, 16, 24, 32, 64, 112, 208, 224, 1984], kernel_size=[3, 3, 3, 5, 3, 3, 3],
               expand_ratio=[1, 4, 4, 4, 4, 6, 6], depth=[2, 3, 3, 4, 3, 5, 1]),
    "a4": dict(resolution=256, width=[16, 16, 24, 32, 64, 112, 192, 216, 1984], kernel_size=[3, 3, 3, 5, 3, 5, 3],
               expand_ratio=[1, 4, 4, 5, 4, 6, 6], depth=[1, 3, 3, 4, 3, 5, 1]),
    "a5": dict(resolution=256, width=[16, 16, 24, 32, 64, 112, 208, 216, 1984], kernel_size=[3, 3, 3, 3, 3, 5, 3],
               expand_ratio=[1, 4, 4, 5, 4, 6, 6], depth=[1, 3, 3, 4, 4, 5, 1]),
    "a5_1": dict(resolution=288, width=[16, 16, 24, 32, 64, 112, 200, 216, 1984], kernel_size=[3, 3, 5, 5, 3, 3, 3],
                 expand_ratio=[1, 4, 4, 4, 5, 6, 6], depth=[2, 3, 4, 3, 3, 5, 1]),
    "a6": dict(resolution=288, width=[16, 16, 24, 32, 64, 112, 216, 224, 1984], kernel_size=[3, 3, 3, 3, 3, 5, 3],
               expand_ratio=[1, 4, 6, 5, 4, 6, 6], depth=[1, 3, 3, 4, 4, 6, 1]),
}
PRESET_ALIASES = {"a5_small": "a5", "a5_base": "a5_1"}
PRESET_TITLES = {"a0": "AlphaNet-A0", "a1": "AlphaNet-A1", "a2": "AlphaNet-A2", "a3": "AlphaNet-A3",
                 "a4": "AlphaNet-A4", "a5": "AlphaNet-A5 (small)", "a5_1": "AlphaNet-A5 (base)", "a6": "AlphaNet-A6"}

_FIELDS = ("resolution", "width", "depth", "kernel_size", "expand_ratio")
_LIST_FIELDS = _FIELDS[1:]


class SearchSpaceError(ValueError):
    """A search space definition or a subnet config does not fit its space."""


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """The reference's rounding to a multiple of `divisor` (halves up, never below 90 % of v)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# ----------------------------------------------------------------------------
# Space description
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    expand_ratios: tuple[float, ...]
    stride: int
    se: bool
    act: str

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def has_expand(self) -> bool:
        """The expansion 1x1 conv exists iff some choice expands (mb1: t=1 has none)."""
        return max(self.expand_ratios) != 1


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One supernet block at maximum size (spec §1.2)."""

    index: int          # global block index
    stage: int          # stage position (0-based, over `stages`)
    position: int       # position inside the stage
    stride: int
    max_in: int
    max_mid: int
    max_out: int
    max_kernel: int
    se: bool
    max_se: int         # SE hidden width at max_mid
    has_expand: bool
    act: str


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """An AttentiveNAS-style MBConv space (also expresses width-only families)."""

    name: str
    resolutions: tuple[int, ...]
    in_channels: int
    num_classes: int
    stem_widths: tuple[int, ...]
    stem_kernel: int
    stem_stride: int
    stages: tuple[StageSpec, ...]
    head_kind: str          # 'v3': expand+BN+act, pool, feature-mix conv (no BN) + act
    head_widths: tuple[int, ...]
    head_expand_ratio: int  # final_expand width = ratio x last stage width
    act: str
    se_reduction: int
    shortcut: str           # 'always': every block residual (AttentiveNAS)

    # -- construction -------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | str) -> "SearchSpace":
        """Builds a space from a dict / ConfigDict with the fields of ALPHANET_SPACE, or a space name."""
        if isinstance(cfg, SearchSpace):
            return cfg
        if isinstance(cfg, str):
            if cfg not in SPACES:
                raise SearchSpaceError(f"unknown search space {cfg!r}; known: {sorted(SPACES)}")
            cfg = SPACES[cfg]
        cfg = _to_plain(cfg)
        known = {"name", "resolutions", "in_channels", "num_classes", "stem", "stages", "head", "act",
                 "se_reduction", "shortcut"}
        unknown = set(cfg) - known
        if unknown:
            raise SearchSpaceError(f"unknown search-space keys {sorted(unknown)}; allowed: {sorted(known)}")
        act = cfg.get("act", "swish")
        stages = []
        for i, st in enumerate(cfg["stages"]):
            st_known = {"name", "widths", "depths", "kernel_sizes", "expand_ratios", "stride", "se", "act"}
            bad = set(st) - st_known
            if bad:
                raise SearchSpaceError(f"stage {i}: unknown keys {sorted(bad)}; allowed: {sorted(st_known)}")
            stages.append(StageSpec(
                name=st.get("name", f"stage{i + 1}"), widths=_ints(st["widths"]), depths=_ints(st["depths"]),
                kernel_sizes=_ints(st["kernel_sizes"]), expand_ratios=tuple(st["expand_ratios"]),
                stride=int(st["stride"]), se=bool(st["se"]), act=st.get("act", act)))
        head = cfg["head"]
        space = cls(
            name=cfg.get("name", "custom"), resolutions=_ints(cfg["resolutions"]),
            in_channels=int(cfg.get("in_channels", 3)), num_classes=int(cfg["num_classes"]),
            stem_widths=_ints(cfg["stem"]["widths"]), stem_kernel=int(cfg["stem"].get("kernel_size", 3)),
            stem_stride=int(cfg["stem"].get("stride", 2)), stages=tuple(stages),
            head_kind=head.get("kind", "v3"), head_widths=_ints(head["widths"]),
            head_expand_ratio=int(head.get("expand_ratio", 6)), act=act,
            se_reduction=int(cfg.get("se_reduction", 4)), shortcut=cfg.get("shortcut", "always"))
        space._check()
        return space

    def _check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SearchSpaceError(f"search space {self.name!r}: {msg}")

        need(len(self.stages) > 0, "needs at least one stage")
        need(self.head_kind == "v3", f"head kind {self.head_kind!r} is not supported (only 'v3')")
        need(self.shortcut == "always", f"shortcut {self.shortcut!r} is not supported (only 'always')")
        need(self.act in ("swish", "relu", "relu6"), f"activation {self.act!r} unknown")
        for name, choices in [("resolutions", self.resolutions), ("stem widths", self.stem_widths),
                              ("head widths", self.head_widths)]:
            need(len(choices) > 0 and all(c > 0 for c in choices), f"{name} must be positive, got {choices}")
        for st in self.stages:
            for field in ("widths", "depths", "kernel_sizes", "expand_ratios"):
                vals = getattr(st, field)
                need(len(vals) > 0 and all(v > 0 for v in vals), f"stage {st.name}: {field} must be positive")
                need(len(set(vals)) == len(vals), f"stage {st.name}: duplicate {field} {vals}")
            need(all(k % 2 == 1 for k in st.kernel_sizes), f"stage {st.name}: kernel sizes must be odd")
            need(st.stride in (1, 2), f"stage {st.name}: stride must be 1 or 2")
        need(self.stem_kernel % 2 == 1, "stem kernel must be odd")

    # -- derived structure ----------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def width_choices(self) -> tuple[tuple[int, ...], ...]:
        """Per position of `SubnetConfig.width`: stem, every stage, head (feature mix)."""
        return (self.stem_widths,) + tuple(s.widths for s in self.stages) + (self.head_widths,)

    def choices(self, field: str) -> tuple[tuple[Any, ...], ...]:
        """Per-position candidate lists of a list field (the reference's cfg_candidates)."""
        if field == "width":
            return self.width_choices
        attr = {"depth": "depths", "kernel_size": "kernel_sizes", "expand_ratio": "expand_ratios"}[field]
        return tuple(getattr(s, attr) for s in self.stages)

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Every supernet block at its maximum shape, in execution order."""
        out = []
        prev_max = max(self.stem_widths)
        for si, st in enumerate(self.stages):
            for pos in range(st.max_depth):
                max_in = prev_max if pos == 0 else max(st.widths)
                max_mid = _round_ratio(max_in, max(st.expand_ratios)) if st.has_expand else max_in
                out.append(BlockSpec(
                    index=len(out), stage=si, position=pos, stride=st.stride if pos == 0 else 1,
                    max_in=max_in, max_mid=max_mid, max_out=max(st.widths), max_kernel=max(st.kernel_sizes),
                    se=st.se, max_se=make_divisible(max_mid // self.se_reduction, 8), has_expand=st.has_expand,
                    act=st.act))
            prev_max = max(st.widths)
        return tuple(out)

    @property
    def num_blocks(self) -> int:
        return sum(s.max_depth for s in self.stages)

    def stage_blocks(self, stage: int) -> range:
        start = sum(s.max_depth for s in self.stages[:stage])
        return range(start, start + self.stages[stage].max_depth)

    @property
    def head_max_expand(self) -> int:
        return self.head_expand_ratio * max(self.stages[-1].widths)

    # -- canonical subnets ----------------------------------------------------
    def max_subnet(self) -> "SubnetConfig":
        return _extreme(self, max)

    def min_subnet(self) -> "SubnetConfig":
        return _extreme(self, min)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            name=self.name, resolutions=list(self.resolutions), in_channels=self.in_channels,
            num_classes=self.num_classes,
            stem=dict(widths=list(self.stem_widths), kernel_size=self.stem_kernel, stride=self.stem_stride),
            stages=[dict(name=s.name, widths=list(s.widths), depths=list(s.depths),
                         kernel_sizes=list(s.kernel_sizes), expand_ratios=list(s.expand_ratios),
                         stride=s.stride, se=s.se, act=s.act) for s in self.stages],
            head=dict(kind=self.head_kind, widths=list(self.head_widths), expand_ratio=self.head_expand_ratio),
            act=self.act, se_reduction=self.se_reduction, shortcut=self.shortcut)

    def describe(self) -> str:
        """A human-readable stage table (for the launcher and logs)."""
        lines = [f"search space {self.name!r}: resolutions {list(self.resolutions)}, "
                 f"{self.num_blocks} blocks, {self.num_classes} classes",
                 f"  {'stage':<10} {'widths':<22} {'depths':<20} {'kernels':<8} {'expand':<10} s  SE"]
        lines.append(f"  {'stem':<10} {str(list(self.stem_widths)):<22} {'-':<20} {self.stem_kernel:<8} {'-':<10} "
                     f"{self.stem_stride}  -")
        for st in self.stages:
            lines.append(f"  {st.name:<10} {str(list(st.widths)):<22} {str(list(st.depths)):<20} "
                         f"{str(list(st.kernel_sizes)):<8} {str(list(st.expand_ratios)):<10} {st.stride}  "
                         f"{'yes' if st.se else 'no'}")
        lines.append(f"  {'head':<10} {str(list(self.head_widths)):<22} (final expand x{self.head_expand_ratio})")
        return "\n".join(lines)


def get_space(space: "SearchSpace | Mapping[str, Any] | str | None" = None) -> SearchSpace:
    """Resolves None (AlphaNet), a name, a dict/ConfigDict or a SearchSpace to a SearchSpace."""
    if space is None:
        return _ALPHANET
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, str) and space in _BUILT:
        return _BUILT[space]
    return SearchSpace.from_config(space)


# ----------------------------------------------------------------------------
# Subnet configs
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubnetConfig:
    """One architecture: the reference's dict (resolution, width, depth, kernel_size, expand_ratio)."""

    resolution: int
    width: tuple[int, ...]
    depth: tuple[int, ...]
    kernel_size: tuple[int, ...]
    expand_ratio: tuple[float, ...]

    def __post_init__(self) -> None:
        for f in _LIST_FIELDS:
            v = getattr(self, f)
            if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
                raise SearchSpaceError(f"subnet field {f!r} must be a list, got {v!r}")
            object.__setattr__(self, f, tuple(_num(x, f) for x in v))
        object.__setattr__(self, "resolution", _num(self.resolution, "resolution"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], space: "SearchSpace | Mapping | str | None" = None
                  ) -> "SubnetConfig":
        """Reads the reference's dict format; extra keys (flops, acc1, net_id) are ignored.

        With `space`, the result is validated against it.
        """
        if not isinstance(d, Mapping):
            raise SearchSpaceError(f"a subnet config must be a dict, got {type(d).__name__}")
        missing = [f for f in _FIELDS if f not in d]
        if missing:
            raise SearchSpaceError(f"subnet config is missing {missing}; it needs keys {list(_FIELDS)}")
        cfg = cls(**{f: d[f] for f in _FIELDS})
        if space is not None:
            cfg.validate(space)
        return cfg

    @classmethod
    def from_json(cls, text: str, space=None) -> "SubnetConfig":
        return cls.from_dict(json.loads(text), space)

    def to_dict(self) -> dict[str, Any]:
        return dict(resolution=self.resolution, width=list(self.width), depth=list(self.depth),
                    kernel_size=list(self.kernel_size), expand_ratio=list(self.expand_ratio))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def replace(self, **kw: Any) -> "SubnetConfig":
        return dataclasses.replace(self, **kw)

    def validate(self, space: "SearchSpace | Mapping | str | None" = None) -> "SubnetConfig":
        """Raises SearchSpaceError naming the field, position, value and allowed choices."""
        space = get_space(space)
        if self.resolution not in space.resolutions:
            raise SearchSpaceError(f"subnet resolution {self.resolution} is not in space {space.name!r}: "
                                   f"allowed {list(space.resolutions)}")
        for f in _LIST_FIELDS:
            cands = space.choices(f)
            vals = getattr(self, f)
            if len(vals) != len(cands):
                raise SearchSpaceError(f"subnet field {f!r} has {len(vals)} entries, space {space.name!r} "
                                       f"needs {len(cands)}")
            for i, (v, c) in enumerate(zip(vals, cands)):
                if v not in c:
                    raise SearchSpaceError(f"subnet {f}[{i}] = {v} is not allowed in space {space.name!r} "
                                           f"({_position_name(space, f, i)}): choices {list(c)}")
        return self


def as_subnet(subnet: "SubnetConfig | Mapping | str", space=None) -> SubnetConfig:
    """A SubnetConfig from a config, a dict, a preset name or a JSON file path; validated."""
    space = get_space(space)
    if isinstance(subnet, SubnetConfig):
        return subnet.validate(space)
    if isinstance(subnet, str):
        return preset(subnet, space) if _preset_key(subnet) in PRESETS or subnet in ("min", "max") \
            else load_subnet(subnet, space)
    return SubnetConfig.from_dict(subnet, space)


def load_subnet(path: str, space=None) -> SubnetConfig:
    """Reads a subnet from a JSON file (the reference's dict format)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise SearchSpaceError(f"subnet {path!r} is neither a preset ({sorted(PRESETS)} , min, max) "
                               f"nor an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise SearchSpaceError(f"subnet file {path!r} is not valid JSON: {e}") from None
    return SubnetConfig.from_dict(d, space)


def preset(name: str, space=None) -> SubnetConfig:
    """AlphaNet A0..A6 by key ('a0'..'a6', 'a5' = A5-small, 'a5_1' = A5-base), or 'min'/'max'."""
    space = get_space(space)
    if name == "min":
        return space.min_subnet()
    if name == "max":
        return space.max_subnet()
    key = _preset_key(name)
    if key not in PRESETS:
        raise SearchSpaceError(f"unknown preset {name!r}; known: {sorted(PRESETS)} "
                               f"(aliases {sorted(PRESET_ALIASES)}), 'min', 'max'")
    return SubnetConfig.from_dict(PRESETS[key], space)


def _preset_key(name: str) -> str:
    key = name.lower().replace("-", "_")
    return PRESET_ALIASES.get(key, key)


# ----------------------------------------------------------------------------
# Resolved architecture: the per-block numbers every consumer uses
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActiveBlock:
    index: int        # global supernet block index
    stage: int
    stride: int
    in_ch: int
    mid: int
    out_ch: int
    kernel: int
    se_mid: int       # 0 when the stage has no SE
    has_expand: bool
    act: str

    @property
    def shortcut(self) -> str:
        """'identity', 'pool', 'conv' or 'pool_conv' (spec §2.3)."""
        if self.stride == 1 and self.in_ch == self.out_ch:
            return "identity"
        pool = self.stride > 1
        conv = self.in_ch != self.out_ch
        return "pool_conv" if pool and conv else ("pool" if pool else "conv")


@dataclasses.dataclass(frozen=True)
class ResolvedSubnet:
    resolution: int
    stem_width: int
    blocks: tuple[ActiveBlock, ...]
    head_expand: int
    head_width: int


def resolve(subnet: SubnetConfig, space=None) -> ResolvedSubnet:
    """The active blocks and channel counts of a subnet (spec §3)."""
    space = get_space(space)
    subnet.validate(space)
    blocks = []
    c_in = subnet.width[0]
    for si, st in enumerate(space.stages):
        c_out = subnet.width[si + 1]
        t = subnet.expand_ratio[si]
        k = subnet.kernel_size[si]
        for pos, gi in enumerate(space.stage_blocks(si)[: subnet.depth[si]]):
            mid = make_divisible(round(c_in * t), 8) if st.has_expand else c_in
            se_mid = make_divisible(mid // space.se_reduction, 8) if st.se else 0
            blocks.append(ActiveBlock(index=gi, stage=si, stride=st.stride if pos == 0 else 1, in_ch=c_in,
                                      mid=mid, out_ch=c_out, kernel=k, se_mid=se_mid, has_expand=st.has_expand,
                                      act=st.act))
            c_in = c_out
    return ResolvedSubnet(resolution=subnet.resolution, stem_width=subnet.width[0], blocks=tuple(blocks),
                          head_expand=space.head_expand_ratio * subnet.width[-2], head_width=subnet.width[-1])


# ----------------------------------------------------------------------------
# Sampling (spec §4.2). Randomness always comes from an explicit random.Random.
# ----------------------------------------------------------------------------


def step_rng(seed: int, step: int, stream: int = 0) -> random.Random:
    """The generator for (seed, step): identical on every host and process."""
    return random.Random(hash_ints(seed, step, stream))


def hash_ints(*xs: int) -> int:
    """A process-independent mix of integers (Python's hash() is salted for str, not int; still explicit)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def sample_subnet(space: SearchSpace, rng: random.Random) -> SubnetConfig:
    """A uniform random subnet, drawn in the reference's order (resolution, widths, depths, kernels, expands)."""
    space = get_space(space)
    res = rng.choice(space.resolutions)
    lists = {f: [rng.choice(c) for c in space.choices(f)] for f in _LIST_FIELDS}
    return SubnetConfig(resolution=res, **lists)


def sample_subnet_in_range(space: SearchSpace, rng: random.Random, min_flops: float, max_flops: float,
                           max_tries: int = 100_000) -> SubnetConfig:
    """Rejection sampling until min_flops <= MFLOPs <= max_flops (reference: no try limit)."""
    from alphanet_jax.flops import count_flops  # same layer; avoids an import cycle

    space = get_space(space)
    if min_flops > max_flops:
        raise SearchSpaceError(f"FLOPs range is empty: min {min_flops} > max {max_flops}")
    for _ in range(max_tries):
        cfg = sample_subnet(space, rng)
        if min_flops <= count_flops(cfg, space) <= max_flops:
            return cfg
    lo, hi = count_flops(space.min_subnet(), space), count_flops(space.max_subnet(), space)
    raise SearchSpaceError(f"no subnet with MFLOPs in [{min_flops}, {max_flops}] after {max_tries} draws; "
                           f"space {space.name!r} spans [{lo:.2f}, {hi:.2f}] MFLOPs")


def mutate(subnet: SubnetConfig, space: SearchSpace, rng: random.Random, prob: float) -> SubnetConfig:
    """The reference's mutate_and_reset: each gene changes to a *different* choice with probability prob."""
    space = get_space(space)

    def pick_another(v, cands):
        return v if len(cands) == 1 else rng.choice([c for c in cands if c != v])

    res = subnet.resolution
    if rng.random() < prob:
        res = pick_another(res, space.resolutions)
    lists = {}
    for f in _LIST_FIELDS:
        vals = list(getattr(subnet, f))
        for i, cands in enumerate(space.choices(f)):
            if rng.random() < prob:
                vals[i] = pick_another(vals[i], cands)
        lists[f] = vals
    return SubnetConfig(resolution=res, **lists)


def crossover(a: SubnetConfig, b: SubnetConfig, rng: random.Random, p: float = 0.5) -> SubnetConfig:
    """The reference's crossover_and_reset: every gene from `a` with probability p, else from `b`."""
    res = a.resolution if rng.random() < p else b.resolution
    lists = {f: [x if rng.random() < p else y for x, y in zip(getattr(a, f), getattr(b, f))]
             for f in _LIST_FIELDS}
    return SubnetConfig(resolution=res, **lists)


def sandwich_subnets(space: SearchSpace, seed: int, step: int, num_arch_training: int = 4
                     ) -> list[SubnetConfig]:
    """The subnets of one sandwich step: max, (n-2) uniform random, min (spec §6.1)."""
    space = get_space(space)
    if num_arch_training < 2:
        raise SearchSpaceError(f"num_arch_training must be >= 2 (max and min), got {num_arch_training}")
    rng = step_rng(seed, step)
    middle = [sample_subnet(space, rng) for _ in range(num_arch_training - 2)]
    return [space.max_subnet(), *middle, space.min_subnet()]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _extreme(space: SearchSpace, pick) -> SubnetConfig:
    return SubnetConfig(resolution=pick(space.resolutions),
                        **{f: [pick(c) for c in space.choices(f)] for f in _LIST_FIELDS})


def _round_ratio(c: int, t: float) -> int:
    return int(round(c * t))


def _ints(xs: Iterable[Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in xs)


def _num(x: Any, field: str):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:  # numpy scalars
            import numbers
            if isinstance(x, numbers.Number) and not isinstance(x, bool):
                x = x.item() if hasattr(x, "item") else x
            else:
                raise TypeError
        except TypeError:
            raise SearchSpaceError(f"subnet field {field!r} holds {x!r}, which is not a number") from None
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _position_name(space: SearchSpace, field: str, i: int) -> str:
    if field == "width":
        names = ["stem"] + [s.name for s in space.stages] + ["head"]
        return names[i]
    return space.stages[i].name


def _to_plain(cfg: Any) -> Any:
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: _to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_to_plain(v) for v in cfg]
    return cfg


_ALPHANET = SearchSpace.from_config(ALPHANET_SPACE)
_BUILT = {"alphanet": _ALPHANET, "tiny": SearchSpace.from_config(TINY_SPACE)}
