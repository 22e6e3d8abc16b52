"""The search space as data: stages, subnet configs, sampling, presets.

Everything else (supernet masks, training sampler, evolutionary search, FLOPs,
export, checkpoint conversion) is driven by a `SearchSpace` built from the plain
dicts below (or from an ml_collections config holding the same fields), so the
stage list is written exactly once. Pure Python: no jax import, it runs inside
search loops.

Semantics follow the AttentiveNAS/AlphaNet reference (spec §1, §3, §4, §5).

Two families share this code: AttentiveNAS-style spaces (every width, depth, kernel
and expand ratio an independent gene: `alphanet`, `tiny`) and width-tied slimmable
spaces (`slimmable_mobilenet_v2`, `tiny_slimmable`: one width multiplier per subnet,
`SubnetConfig.width_mult`, widths make_divisible(base x m, 8)). Sampling, mutation,
crossover, validation and the dict format handle both; callers need not know which.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any, Iterable, Mapping

from alphanet_jax.errors import ConfigError

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

# Universally slimmable MobileNetV2 (US-Nets, arXiv 1903.05134; MobileNetV2, arXiv 1801.04381): one width
# multiplier m scales every layer, channels = make_divisible(base x m, 8). The multipliers are US-Nets'
# `width_mult_list` (0.35 to 1.0 in steps of 0.025). Depth, kernel and expansion are fixed (one choice
# each); the t=1 block has no expansion conv. The last 1x1 conv stays 1280 wide at every width (as in
# US-Nets' `us=[True, False]` tail and the MobileNetV2 paper for m <= 1): this gives the published
# 300.77 / 59.29 MFLOPs at 1.0x / 0.35x. Residual add only when stride 1 and in == out; ReLU6; 'v2' head.
SLIM_WIDTH_MULTIPLIERS = [0.35, 0.375, 0.4, 0.425, 0.45, 0.475, 0.5, 0.525, 0.55, 0.575, 0.6, 0.625, 0.65,
                          0.675, 0.7, 0.725, 0.75, 0.775, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 1.0]

SLIMMABLE_MOBILENET_V2_SPACE: dict[str, Any] = dict(
    name="slimmable_mobilenet_v2",
    resolutions=[224],
    in_channels=3,
    num_classes=1000,
    width_multipliers=SLIM_WIDTH_MULTIPLIERS,
    stem=dict(base_width=32, kernel_size=3, stride=2),
    stages=[  # MobileNetV2's (t, c, n, s) table
        dict(name="ir1", base_width=16, depths=[1], kernel_sizes=[3], expand_ratios=[1], stride=1, se=False),
        dict(name="ir2", base_width=24, depths=[2], kernel_sizes=[3], expand_ratios=[6], stride=2, se=False),
        dict(name="ir3", base_width=32, depths=[3], kernel_sizes=[3], expand_ratios=[6], stride=2, se=False),
        dict(name="ir4", base_width=64, depths=[4], kernel_sizes=[3], expand_ratios=[6], stride=2, se=False),
        dict(name="ir5", base_width=96, depths=[3], kernel_sizes=[3], expand_ratios=[6], stride=1, se=False),
        dict(name="ir6", base_width=160, depths=[3], kernel_sizes=[3], expand_ratios=[6], stride=2, se=False),
        dict(name="ir7", base_width=320, depths=[1], kernel_sizes=[3], expand_ratios=[6], stride=1, se=False),
    ],
    head=dict(kind="v2", widths=[1280]),
    act="relu6",
    se_reduction=4,
    shortcut="identity_when_same",
)

# The same family at digits scale (8x8 digits upsampled to 24), for tests and the slimmable quickstart.
TINY_SLIMMABLE_SPACE: dict[str, Any] = dict(
    name="tiny_slimmable",
    resolutions=[24],
    in_channels=3,
    num_classes=10,
    width_multipliers=[0.35, 0.5, 0.75, 1.0],
    stem=dict(base_width=32, kernel_size=3, stride=2),
    stages=[
        dict(name="ir1", base_width=16, depths=[1], kernel_sizes=[3], expand_ratios=[1], stride=1, se=False),
        dict(name="ir2", base_width=24, depths=[2], kernel_sizes=[3], expand_ratios=[3], stride=2, se=False),
        dict(name="ir3", base_width=32, depths=[2], kernel_sizes=[3], expand_ratios=[3], stride=2, se=False),
        dict(name="ir4", base_width=48, depths=[1], kernel_sizes=[3], expand_ratios=[3], stride=1, se=False),
    ],
    head=dict(kind="v2", widths=[128]),
    act="relu6",
    se_reduction=4,
    shortcut="identity_when_same",
)

SPACES: dict[str, dict[str, Any]] = {"alphanet": ALPHANET_SPACE, "tiny": TINY_SPACE,
                                     "slimmable_mobilenet_v2": SLIMMABLE_MOBILENET_V2_SPACE,
                                     "tiny_slimmable": TINY_SLIMMABLE_SPACE}

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
# Result fields the reference writes beside a subnet's genes; ignored when read back.
_REFERENCE_RESULT_KEYS = ("net_id", "flops", "params", "acc1", "acc5", "loss")


class SearchSpaceError(ConfigError):
    """A search space definition or a subnet config does not fit its space."""


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """The reference's rounding to a multiple of `divisor` (halves up, never below 90 % of v)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def scaled_width(base: int, multiplier: float, divisor: int = 8) -> int:
    """make_divisible(base x multiplier, 8): a tied width at a width multiplier (slimmable spaces).

    The product is rounded to 6 decimals first, so that float noise (160 x 0.475 = 75.999...) cannot move
    a value sitting exactly on a rounding boundary (200 x 0.58 = 115.99999999999999 -> 112, not 120).
    """
    return make_divisible(round(base * multiplier, 6), divisor)


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
    shortcut_mode: str = "always"  # the space's `shortcut`


HEAD_KINDS = ("v3", "v2")
SHORTCUTS = ("always", "identity_when_same")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """An MBConv supernet space: AttentiveNAS-style (every gene elastic) or width-tied (slimmable).

    Two families run on the same code:
    * per-position choices (AlphaNet/AttentiveNAS): every width position, depth, kernel and expand
      ratio is drawn independently from its candidate list; 'v3' head, 'always' shortcut, swish.
    * width-tied (US-Nets-style slimmable): `width_multipliers` is non-empty and positions declared
      with a `base_width` take make_divisible(base x m, 8) for ONE multiplier m per subnet
      (`SubnetConfig.width_mult`); positions declared with `widths` stay independent choices (a
      single choice is a fixed width, e.g. MobileNetV2's 1280 head). For those positions
      `width_choices` holds the derived widths, so every consumer of max shapes works unchanged.

    head_kind: 'v3' (MobileNetV3/AttentiveNAS: expand 1x1 + BN + act, pool, feature-mix 1x1 without
    BN + act, classifier) or 'v2' (MobileNetV2: 1x1 conv + BN + act to the head width, pool,
    classifier). shortcut: 'always' (AttentiveNAS: every block residual, through a 2x2 avg-pool when
    strided and a 1x1 conv when the widths differ) or 'identity_when_same' (MobileNetV2: residual add
    only when stride 1 and in == out channels, no shortcut layers).
    """

    name: str
    resolutions: tuple[int, ...]
    in_channels: int
    num_classes: int
    stem_widths: tuple[int, ...]
    stem_kernel: int
    stem_stride: int
    stages: tuple[StageSpec, ...]
    head_kind: str          # 'v3': expand+BN+act, pool, feature-mix conv (no BN) + act; 'v2': conv+BN+act, pool
    head_widths: tuple[int, ...]
    head_expand_ratio: int  # v3: final_expand width = ratio x last stage width (0 for v2)
    act: str
    se_reduction: int
    shortcut: str           # 'always': every block residual (AttentiveNAS); 'identity_when_same' (MobileNetV2)
    width_multipliers: tuple[float, ...] = ()  # non-empty: widths tied to one multiplier per subnet
    width_bases: tuple[int, ...] = ()          # per width position: base width if tied, else 0

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
                 "se_reduction", "shortcut", "width_multipliers"}
        unknown = set(cfg) - known
        if unknown:
            raise SearchSpaceError(f"unknown search-space keys {sorted(unknown)}; allowed: {sorted(known)}")
        space_name = cfg.get("name", "custom")
        mults = tuple(float(m) for m in (cfg.get("width_multipliers") or ()))
        if any(not m > 0 for m in mults):
            raise SearchSpaceError(f"search space {space_name!r}: width_multipliers must be positive, got "
                                   f"{list(mults)}")

        def widths_of(d: Mapping[str, Any], where: str) -> tuple[tuple[int, ...], int]:
            has_w, has_b = "widths" in d, "base_width" in d
            if has_w == has_b:
                raise SearchSpaceError(f"search space {space_name!r}, {where}: give exactly one of 'widths' "
                                       f"(independent choices) and 'base_width' (scaled by the width multiplier)")
            if has_w:
                return _ints(d["widths"]), 0
            if not mults:
                raise SearchSpaceError(f"search space {space_name!r}, {where}: 'base_width' needs the space's "
                                       f"'width_multipliers'")
            base = int(d["base_width"])
            if base <= 0:
                raise SearchSpaceError(f"search space {space_name!r}, {where}: base_width must be positive")
            return tuple(sorted({scaled_width(base, m) for m in mults})), base

        act = cfg.get("act", "swish")
        stem = cfg["stem"]
        bad = set(stem) - {"widths", "base_width", "kernel_size", "stride"}
        if bad:
            raise SearchSpaceError(f"stem: unknown keys {sorted(bad)}; allowed: "
                                   f"{sorted({'widths', 'base_width', 'kernel_size', 'stride'})}")
        stem_widths, stem_base = widths_of(stem, "stem")
        stages, bases = [], [stem_base]
        for i, st in enumerate(cfg["stages"]):
            st_known = {"name", "widths", "base_width", "depths", "kernel_sizes", "expand_ratios", "stride", "se",
                        "act"}
            bad = set(st) - st_known
            if bad:
                raise SearchSpaceError(f"stage {i}: unknown keys {sorted(bad)}; allowed: {sorted(st_known)}")
            name = st.get("name", f"stage{i + 1}")
            widths, base = widths_of(st, f"stage {name}")
            bases.append(base)
            stages.append(StageSpec(
                name=name, widths=widths, depths=_ints(st["depths"]),
                kernel_sizes=_ints(st["kernel_sizes"]), expand_ratios=tuple(st["expand_ratios"]),
                stride=int(st["stride"]), se=bool(st["se"]), act=st.get("act", act)))
        head = cfg["head"]
        head_kind = head.get("kind", "v3")
        head_known = {"kind", "widths", "base_width"} | ({"expand_ratio"} if head_kind == "v3" else set())
        bad = set(head) - head_known
        if bad:
            raise SearchSpaceError(f"head ({head_kind!r}): unknown keys {sorted(bad)}; allowed: {sorted(head_known)}")
        head_widths, head_base = widths_of(head, "head")
        bases.append(head_base)
        if mults and not any(bases):
            raise SearchSpaceError(f"search space {space_name!r}: width_multipliers given but no stem/stage/head "
                                   f"has a 'base_width' to scale")
        space = cls(
            name=space_name, resolutions=_ints(cfg["resolutions"]),
            in_channels=int(cfg.get("in_channels", 3)), num_classes=int(cfg["num_classes"]),
            stem_widths=stem_widths, stem_kernel=int(stem.get("kernel_size", 3)),
            stem_stride=int(stem.get("stride", 2)), stages=tuple(stages),
            head_kind=head_kind, head_widths=head_widths,
            head_expand_ratio=int(head.get("expand_ratio", 6)) if head_kind == "v3" else 0, act=act,
            se_reduction=int(cfg.get("se_reduction", 4)), shortcut=cfg.get("shortcut", "always"),
            width_multipliers=mults, width_bases=tuple(bases) if mults else ())
        space._check()
        return space

    def _check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SearchSpaceError(f"search space {self.name!r}: {msg}")

        need(len(self.stages) > 0, "needs at least one stage")
        need(self.head_kind in HEAD_KINDS, f"head kind {self.head_kind!r} is not supported (one of {HEAD_KINDS})")
        need(self.shortcut in SHORTCUTS, f"shortcut {self.shortcut!r} is not supported (one of {SHORTCUTS})")
        need(self.head_kind != "v3" or self.head_expand_ratio >= 1, "a 'v3' head needs expand_ratio >= 1")
        if self.width_multipliers:
            ms = self.width_multipliers
            need(list(ms) == sorted(set(ms)), f"width_multipliers must be increasing and distinct, got {list(ms)}")
            need(len(self.width_bases) == self.num_stages + 2,
                 f"width_bases needs {self.num_stages + 2} entries (stem, stages, head)")
            seen: dict[tuple, float] = {}
            for m in ms:
                key = tuple(w for w in self.tied_widths(m) if w is not None)
                need(key not in seen, f"width multipliers {seen.get(key)} and {m} give the same widths {list(key)}; "
                                      f"drop one")
                seen[key] = m
        else:
            need(not self.width_bases, "width_bases without width_multipliers")
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
        prev_widths = self.stem_widths
        for si, st in enumerate(self.stages):
            for pos in range(st.max_depth):
                in_widths = prev_widths if pos == 0 else st.widths
                max_in = max(in_widths)
                # The widest hidden width any subnet gives this block (`expanded_width`, as `resolve`
                # computes it): the reference's round(max_in x max_t) whenever widths are multiples of 8.
                mids = [expanded_width(c, t) for c in in_widths for t in st.expand_ratios] if st.has_expand \
                    else list(in_widths)
                max_mid = max(mids)
                out.append(BlockSpec(
                    index=len(out), stage=si, position=pos, stride=st.stride if pos == 0 else 1,
                    max_in=max_in, max_mid=max_mid, max_out=max(st.widths), max_kernel=max(st.kernel_sizes),
                    se=st.se, max_se=max(make_divisible(m // self.se_reduction, 8) for m in mids),
                    has_expand=st.has_expand, act=st.act, shortcut_mode=self.shortcut))
            prev_widths = st.widths
        return tuple(out)

    @property
    def num_blocks(self) -> int:
        return sum(s.max_depth for s in self.stages)

    def stage_blocks(self, stage: int) -> range:
        start = sum(s.max_depth for s in self.stages[:stage])
        return range(start, start + self.stages[stage].max_depth)

    @property
    def head_max_expand(self) -> int:
        """Width of the head's first 1x1 conv at its maximum ('v3': final expand; 'v2': the head conv)."""
        if self.head_kind == "v2":
            return max(self.head_widths)
        return self.head_expand_ratio * max(self.stages[-1].widths)

    # -- width multipliers (width-tied spaces) --------------------------------------
    @property
    def is_width_tied(self) -> bool:
        """True for slimmable spaces: one width multiplier per subnet sets every `base_width` position."""
        return bool(self.width_multipliers)

    def tied_widths(self, multiplier: float) -> tuple[int | None, ...]:
        """Per width position: make_divisible(base x multiplier, 8) where tied, None where an independent choice."""
        if not self.width_multipliers:
            raise SearchSpaceError(f"search space {self.name!r} has no width multipliers")
        return tuple(scaled_width(b, multiplier) if b else None for b in self.width_bases)

    def match_multiplier(self, multiplier: float) -> float:
        """The declared multiplier equal to `multiplier` (within 1e-9); SearchSpaceError if none."""
        if not self.width_multipliers:
            raise SearchSpaceError(f"width multiplier {multiplier} given, but search space {self.name!r} has no "
                                   f"width multipliers (its widths are per-position choices)")
        for m in self.width_multipliers:
            if math.isclose(m, multiplier, rel_tol=0.0, abs_tol=1e-9):
                return m
        raise SearchSpaceError(f"width multiplier {multiplier} is not in space {self.name!r}: choices "
                               f"{list(self.width_multipliers)}")

    def multiplier_of(self, subnet: "SubnetConfig") -> float | None:
        """The multiplier whose tied widths the subnet has (None if none does, or the space is not tied)."""
        if not self.width_multipliers:
            return None
        for m in self.width_multipliers:
            tied = self.tied_widths(m)
            if len(tied) == len(subnet.width) and all(t is None or t == w for t, w in zip(tied, subnet.width)):
                return m
        return None

    def width_subnet(self, multiplier: float, resolution: int | None = None) -> "SubnetConfig":
        """The subnet at one width multiplier; untied widths and the other genes at their max choice,
        `resolution` defaulting to the largest."""
        m = self.match_multiplier(multiplier)
        width = [t if t is not None else max(c) for t, c in zip(self.tied_widths(m), self.width_choices)]
        cfg = SubnetConfig(resolution=max(self.resolutions) if resolution is None else resolution, width=width,
                           width_mult=m, **{f: [max(c) for c in self.choices(f)] for f in _LIST_FIELDS[1:]})
        return cfg.validate(self)

    # -- canonical subnets ----------------------------------------------------
    def max_subnet(self) -> "SubnetConfig":
        return _extreme(self, max)

    def min_subnet(self) -> "SubnetConfig":
        return _extreme(self, min)

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form (`from_config` reads it back). Width-tied positions are written as
        `base_width`, and `width_multipliers` appears only for width-tied spaces, so AttentiveNAS-style
        spaces keep their original dict."""
        bases = self.width_bases or (0,) * (self.num_stages + 2)

        def w(i: int, choices: tuple[int, ...]) -> dict[str, Any]:
            return dict(base_width=bases[i]) if bases[i] else dict(widths=list(choices))

        head = dict(kind=self.head_kind, **w(self.num_stages + 1, self.head_widths))
        if self.head_kind == "v3":
            head["expand_ratio"] = self.head_expand_ratio
        d = dict(
            name=self.name, resolutions=list(self.resolutions), in_channels=self.in_channels,
            num_classes=self.num_classes,
            stem=dict(**w(0, self.stem_widths), kernel_size=self.stem_kernel, stride=self.stem_stride),
            stages=[dict(name=s.name, **w(i + 1, s.widths), depths=list(s.depths),
                         kernel_sizes=list(s.kernel_sizes), expand_ratios=list(s.expand_ratios),
                         stride=s.stride, se=s.se, act=s.act) for i, s in enumerate(self.stages)],
            head=head, act=self.act, se_reduction=self.se_reduction, shortcut=self.shortcut)
        if self.width_multipliers:
            d["width_multipliers"] = list(self.width_multipliers)
        return d

    def describe(self) -> str:
        """A human-readable stage table (for the launcher and logs)."""
        bases = self.width_bases or (0,) * (self.num_stages + 2)

        def w(i: int, choices: tuple[int, ...]) -> str:
            if bases[i]:
                return f"{bases[i]} x m ({min(choices)}..{max(choices)})"
            return str(list(choices))

        lines = [f"search space {self.name!r}: resolutions {list(self.resolutions)}, "
                 f"{self.num_blocks} blocks, {self.num_classes} classes, {self.act}, shortcut {self.shortcut}"]
        if self.width_multipliers:
            lines.append(f"  one width multiplier m per subnet, widths make_divisible(base x m, 8), m in "
                         f"{list(self.width_multipliers)}")
        lines.append(f"  {'stage':<10} {'widths':<22} {'depths':<20} {'kernels':<8} {'expand':<10} s  SE")
        lines.append(f"  {'stem':<10} {w(0, self.stem_widths):<22} {'-':<20} {self.stem_kernel:<8} {'-':<10} "
                     f"{self.stem_stride}  -")
        for i, st in enumerate(self.stages):
            lines.append(f"  {st.name:<10} {w(i + 1, st.widths):<22} {str(list(st.depths)):<20} "
                         f"{str(list(st.kernel_sizes)):<8} {str(list(st.expand_ratios)):<10} {st.stride}  "
                         f"{'yes' if st.se else 'no'}")
        if self.head_kind == "v3":
            lines.append(f"  {'head':<10} {w(self.num_stages + 1, self.head_widths):<22} "
                         f"(v3: final expand x{self.head_expand_ratio}, feature mix)")
        else:
            lines.append(f"  {'head':<10} {w(self.num_stages + 1, self.head_widths):<22} (v2: 1x1 conv + BN)")
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
    """One architecture: the reference's dict (resolution, width, depth, kernel_size, expand_ratio).

    `width_mult` is set only in width-tied (slimmable) spaces: the one multiplier the widths derive
    from (width[i] = make_divisible(base[i] x width_mult, 8) at every tied position). It is redundant
    with `width` but makes the width a single gene for `crossover` (which sees no space) and names
    the subnet; it is written to the dict only when set, so AttentiveNAS-style dicts are unchanged.
    """

    resolution: int
    width: tuple[int, ...]
    depth: tuple[int, ...]
    kernel_size: tuple[int, ...]
    expand_ratio: tuple[float, ...]
    width_mult: float | None = None

    def __post_init__(self) -> None:
        for f in _LIST_FIELDS:
            v = getattr(self, f)
            if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
                raise SearchSpaceError(f"subnet field {f!r} must be a list, got {v!r}")
            object.__setattr__(self, f, tuple(_num(x, f) for x in v))
        object.__setattr__(self, "resolution", _num(self.resolution, "resolution"))
        if self.width_mult is not None:
            m = float(_num(self.width_mult, "width_mult"))
            if not m > 0:
                raise SearchSpaceError(f"subnet width_mult must be positive, got {self.width_mult!r}")
            object.__setattr__(self, "width_mult", m)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], space: "SearchSpace | Mapping | str | None" = None
                  ) -> "SubnetConfig":
        """Reads the reference's dict format; its result keys (net_id, flops, params, acc1, acc5, loss) are
        ignored, any other unknown key is an error (a misspelt `width_mult` would otherwise be dropped).

        With `space`, the result is validated against it and, in a width-tied space, carries its
        `width_mult` (inferred from the widths when the dict has none). There a dict may also give
        just `resolution` and `width_mult`: the widths follow from the multiplier and the other
        genes default to the space's max choice (the only choice in a width-only space).
        """
        if not isinstance(d, Mapping):
            raise SearchSpaceError(f"a subnet config must be a dict, got {type(d).__name__}")
        unknown = sorted(map(str, set(d) - {*_FIELDS, "width_mult", *_REFERENCE_RESULT_KEYS}))
        if unknown:
            raise SearchSpaceError(f"unknown subnet keys {unknown}; a subnet has {list(_FIELDS)} and optionally "
                                   f"'width_mult' (the reference's {list(_REFERENCE_RESULT_KEYS)} are ignored)")
        sp = get_space(space) if space is not None else None
        wm = d.get("width_mult")
        if sp is not None and sp.width_multipliers and wm is not None and any(f not in d for f in _LIST_FIELDS):
            template = sp.width_subnet(_num(wm, "width_mult"), resolution=d.get("resolution"))
            d = {**template.to_dict(), **d}
        missing = [f for f in _FIELDS if f not in d]
        if missing:
            hint = " (or resolution and width_mult in a width-tied space)" if sp is None or sp.width_multipliers \
                else ""
            raise SearchSpaceError(f"subnet config is missing {missing}; it needs keys {list(_FIELDS)}{hint}")
        cfg = cls(**{f: d[f] for f in _FIELDS}, width_mult=wm)
        if sp is not None:
            cfg = _canonical(cfg.validate(sp), sp)
        return cfg

    @classmethod
    def from_json(cls, text: str, space=None) -> "SubnetConfig":
        return cls.from_dict(json.loads(text), space)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(resolution=self.resolution)
        if self.width_mult is not None:
            d["width_mult"] = self.width_mult
        d.update(width=list(self.width), depth=list(self.depth), kernel_size=list(self.kernel_size),
                 expand_ratio=list(self.expand_ratio))
        return d

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
        if not space.width_multipliers:
            if self.width_mult is not None:
                space.match_multiplier(self.width_mult)  # raises: this space has no multipliers
            return self
        # Width-tied space: the tied positions must all come from one multiplier.
        if self.width_mult is not None:
            m = space.match_multiplier(self.width_mult)
            tied = space.tied_widths(m)
            bad = [i for i, (t, w) in enumerate(zip(tied, self.width)) if t is not None and t != w]
            if bad:
                expected = [t if t is not None else w for t, w in zip(tied, self.width)]
                i = bad[0]
                raise SearchSpaceError(
                    f"subnet width {list(self.width)} does not match its width_mult {m} in space {space.name!r}: "
                    f"width[{i}] ({_position_name(space, 'width', i)}) = {self.width[i]}, expected "
                    f"make_divisible({space.width_bases[i]} x {m}, 8) = {tied[i]}; the widths of {m} are {expected}")
        elif space.multiplier_of(self) is None:
            raise SearchSpaceError(
                f"subnet width {list(self.width)} is not the width of one multiplier in space {space.name!r}: "
                f"widths are tied, width[i] = make_divisible(base[i] x m, 8) with bases "
                f"{[b or None for b in space.width_bases]} for one m in {list(space.width_multipliers)}; "
                f"give width_mult or the widths of a single multiplier")
        return self


def as_subnet(subnet: "SubnetConfig | Mapping | str", space=None) -> SubnetConfig:
    """A SubnetConfig from a config, a dict, a preset name or a JSON file path; validated."""
    space = get_space(space)
    if isinstance(subnet, SubnetConfig):
        return _canonical(subnet.validate(space), space)
    if isinstance(subnet, str):
        named = _preset_key(subnet) in PRESETS or subnet in ("min", "max") or _multiplier_name(subnet) is not None
        return preset(subnet, space) if named else load_subnet(subnet, space)
    return SubnetConfig.from_dict(subnet, space)


def load_subnet(path: str, space=None) -> SubnetConfig:
    """Reads a subnet from a JSON file (the reference's dict format)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise SearchSpaceError(f"subnet {path!r} is neither a preset ({sorted(PRESETS)} , min, max) "
                               f"nor an existing JSON file") from None
    except IsADirectoryError:
        raise SearchSpaceError(f"subnet {path!r} is a directory: give a preset name or a subnet JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # also a binary file
        raise SearchSpaceError(f"subnet file {path!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise SearchSpaceError(f"subnet file {path!r} holds a JSON {type(d).__name__}, not a subnet object")
    try:
        return SubnetConfig.from_dict(d, space)
    except SearchSpaceError as e:
        raise SearchSpaceError(f"subnet file {path!r}: {e}") from None


def preset(name: str, space=None) -> SubnetConfig:
    """AlphaNet A0..A6 by key ('a0'..'a6', 'a5' = A5-small, 'a5_1' = A5-base), 'min'/'max', or in a
    width-tied space a width multiplier written 'Mx' ('1.0x', '0.35x'; the largest resolution)."""
    space = get_space(space)
    if name == "min":
        return space.min_subnet()
    if name == "max":
        return space.max_subnet()
    m = _multiplier_name(name)
    if m is not None:
        return space.width_subnet(m)
    key = _preset_key(name)
    if key not in PRESETS:
        raise SearchSpaceError(f"unknown preset {name!r}; known: {sorted(PRESETS)} "
                               f"(aliases {sorted(PRESET_ALIASES)}), 'min', 'max', and width multipliers "
                               f"such as '0.5x' in width-tied spaces")
    return SubnetConfig.from_dict(PRESETS[key], space)


def _preset_key(name: str) -> str:
    key = name.lower().replace("-", "_")
    return PRESET_ALIASES.get(key, key)


def _multiplier_name(name: str) -> float | None:
    """0.35 for '0.35x' (a width-multiplier subnet name), else None."""
    n = name.strip().lower()
    if n.endswith("x"):
        try:
            return float(n[:-1])
        except ValueError:
            return None
    return None


def _canonical(cfg: SubnetConfig, space: SearchSpace) -> SubnetConfig:
    """A validated subnet with `width_mult` set (to the declared value) in width-tied spaces."""
    if not space.width_multipliers:
        return cfg
    m = space.multiplier_of(cfg) if cfg.width_mult is None else space.match_multiplier(cfg.width_mult)
    return cfg if cfg.width_mult == m else cfg.replace(width_mult=m)


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
    shortcut_mode: str = "always"  # the space's `shortcut`

    @property
    def shortcut(self) -> str:
        """'identity', 'pool', 'conv' or 'pool_conv' (spec §2.3), or 'none' (no residual) when the
        space's shortcut is 'identity_when_same' and the block is strided or changes width."""
        if self.stride == 1 and self.in_ch == self.out_ch:
            return "identity"
        if self.shortcut_mode == "identity_when_same":
            return "none"
        pool = self.stride > 1
        conv = self.in_ch != self.out_ch
        return "pool_conv" if pool and conv else ("pool" if pool else "conv")


@dataclasses.dataclass(frozen=True)
class ResolvedSubnet:
    resolution: int
    stem_width: int
    blocks: tuple[ActiveBlock, ...]
    head_expand: int  # output of the head's first 1x1 conv (v3: final expand; v2: the head conv)
    head_width: int   # classifier input (v3: feature mix output; v2: = head_expand)
    head_in: int = 0  # input of the head (the last stage's width)


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
            mid = expanded_width(c_in, t) if st.has_expand else c_in
            se_mid = make_divisible(mid // space.se_reduction, 8) if st.se else 0
            blocks.append(ActiveBlock(index=gi, stage=si, stride=st.stride if pos == 0 else 1, in_ch=c_in,
                                      mid=mid, out_ch=c_out, kernel=k, se_mid=se_mid, has_expand=st.has_expand,
                                      act=st.act, shortcut_mode=space.shortcut))
            c_in = c_out
    head_expand = (subnet.width[-1] if space.head_kind == "v2"
                   else space.head_expand_ratio * subnet.width[-2])
    return ResolvedSubnet(resolution=subnet.resolution, stem_width=subnet.width[0], blocks=tuple(blocks),
                          head_expand=head_expand, head_width=subnet.width[-1], head_in=subnet.width[-2])


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
    if space.width_multipliers:
        # Width-tied: one multiplier for every tied position (uniform over the declared multipliers).
        m = rng.choice(space.width_multipliers)
        width = [t if t is not None else rng.choice(c) for t, c in zip(space.tied_widths(m), space.width_choices)]
        lists = {f: [rng.choice(c) for c in space.choices(f)] for f in _LIST_FIELDS[1:]}
        return SubnetConfig(resolution=res, width=width, width_mult=m, **lists)
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
    """The reference's mutate_and_reset: each gene changes to a *different* choice with probability prob.

    In a width-tied space the width multiplier is one gene (the tied widths follow it); untied width
    positions and the other genes mutate position by position as usual.
    """
    space = get_space(space)

    def pick_another(v, cands):
        return v if len(cands) == 1 else rng.choice([c for c in cands if c != v])

    res = subnet.resolution
    if rng.random() < prob:
        res = pick_another(res, space.resolutions)
    lists = {}
    wm = None
    fields = _LIST_FIELDS
    if space.width_multipliers:
        wm = subnet.width_mult if subnet.width_mult is not None else space.multiplier_of(subnet)
        if wm is None:
            subnet.validate(space)  # raises with the reason
        wm = space.match_multiplier(wm)
        if rng.random() < prob:
            wm = pick_another(wm, space.width_multipliers)
        width = list(subnet.width)
        for i, (t, cands) in enumerate(zip(space.tied_widths(wm), space.width_choices)):
            if t is not None:
                width[i] = t
            elif rng.random() < prob:
                width[i] = pick_another(width[i], cands)
        lists["width"] = width
        fields = _LIST_FIELDS[1:]
    for f in fields:
        vals = list(getattr(subnet, f))
        for i, cands in enumerate(space.choices(f)):
            if rng.random() < prob:
                vals[i] = pick_another(vals[i], cands)
        lists[f] = vals
    return SubnetConfig(resolution=res, width_mult=wm, **lists)


def crossover(a: SubnetConfig, b: SubnetConfig, rng: random.Random, p: float = 0.5) -> SubnetConfig:
    """The reference's crossover_and_reset: every gene from `a` with probability p, else from `b`.

    Subnets of a width-tied space (`width_mult` set) take the whole width list and its multiplier
    from one parent (one gene), so the child keeps a single consistent multiplier.
    """
    res = a.resolution if rng.random() < p else b.resolution
    if a.width_mult is not None or b.width_mult is not None:
        src = a if rng.random() < p else b
        lists = {f: [x if rng.random() < p else y for x, y in zip(getattr(a, f), getattr(b, f))]
                 for f in _LIST_FIELDS[1:]}
        return SubnetConfig(resolution=res, width=src.width, width_mult=src.width_mult, **lists)
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
    if space.width_multipliers:
        m = pick(space.width_multipliers)
        width = [t if t is not None else pick(c) for t, c in zip(space.tied_widths(m), space.width_choices)]
        return SubnetConfig(resolution=pick(space.resolutions), width=width, width_mult=m,
                            **{f: [pick(c) for c in space.choices(f)] for f in _LIST_FIELDS[1:]})
    return SubnetConfig(resolution=pick(space.resolutions),
                        **{f: [pick(c) for c in space.choices(f)] for f in _LIST_FIELDS})


def expanded_width(c_in: int, t: float) -> int:
    """A block's hidden width for input width `c_in` and expand ratio `t`: make_divisible(round(c_in t), 8)
    (spec §3.3); the supernet's tensors are sized with it too."""
    return make_divisible(round(c_in * t), 8)


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
_BUILT = {"alphanet": _ALPHANET, **{k: SearchSpace.from_config(v) for k, v in SPACES.items() if k != "alphanet"}}
