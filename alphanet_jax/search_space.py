"""The search space's schema: `SearchSpace` (stages, derived block shapes, width multipliers) and
`SubnetConfig` (one architecture in the reference's dict format, validated against a space).

A `SearchSpace` is built from a plain dict (`spaces.py`, or an ml_collections config holding the
same fields; read by `space_dict`), so the stage list is written exactly once; everything else
(supernet masks, sampling, evolutionary search, FLOPs, export, checkpoint conversion) is driven by
it. Pure Python: no jax import, it runs inside search loops. Semantics follow the AttentiveNAS/AlphaNet
reference (spec §1, §3).

Two families share this code: AttentiveNAS-style spaces (every width, depth, kernel and expand
ratio an independent gene: `alphanet`, `tiny`) and width-tied slimmable spaces
(`slimmable_mobilenet_v2`, `tiny_slimmable`: one width multiplier per subnet,
`SubnetConfig.width_mult`, widths make_divisible(base x m, 8)). Validation, the dict format and
`SearchSpace.pick_subnet` (extreme and random subnets) handle both; callers need not know which.

`SearchSpace` and `SubnetConfig` share this module because each needs the other: a space makes its
min, max and width-multiplier subnets, a subnet validates against a space.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Sequence

from alphanet_jax import space_dict
from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.spaces import SPACES
from alphanet_jax.widths import expanded_width, scaled_width, se_width

SUBNET_FIELDS = ("resolution", "width", "depth", "kernel_size", "expand_ratio")
LIST_FIELDS = SUBNET_FIELDS[1:]
# Result fields the reference writes beside a subnet's genes; ignored when read back.
_REFERENCE_RESULT_KEYS = ("net_id", "flops", "params", "acc1", "acc5", "loss")


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
        fields = space_dict.read(cfg)
        space = cls(**{**fields, "stages": tuple(StageSpec(**st) for st in fields["stages"])})
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
                    se=st.se, max_se=max(se_width(m, self.se_reduction) for m in mids),
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
        return self.pick_subnet(max, multiplier=m, resolution=resolution).validate(self)

    # -- canonical subnets ----------------------------------------------------
    def max_subnet(self) -> "SubnetConfig":
        return self.pick_subnet(max)

    def min_subnet(self) -> "SubnetConfig":
        return self.pick_subnet(min)

    def pick_subnet(self, pick: Callable[[Sequence[Any]], Any], multiplier: float | None = None,
                    resolution: int | None = None) -> "SubnetConfig":
        """The subnet whose every gene is `pick(choices)`, asked in the reference's order: resolution, the
        width multiplier (width-tied spaces), widths, depths, kernel sizes, expand ratios. `max` and `min`
        give the extreme subnets, `rng.choice` a uniform random one (`sampling.sample_subnet`);
        `multiplier` and `resolution` fix those genes instead of picking them."""
        res = pick(self.resolutions) if resolution is None else resolution
        if not self.width_multipliers:
            return SubnetConfig(resolution=res, **{f: [pick(c) for c in self.choices(f)] for f in LIST_FIELDS})
        m = pick(self.width_multipliers) if multiplier is None else multiplier
        width = [t if t is not None else pick(c) for t, c in zip(self.tied_widths(m), self.width_choices)]
        return SubnetConfig(resolution=res, width=width, width_mult=m,
                            **{f: [pick(c) for c in self.choices(f)] for f in LIST_FIELDS[1:]})

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form (`from_config` reads it back; `space_dict.write`)."""
        return space_dict.write(self)

    def describe(self) -> str:
        """A human-readable stage table (for the launcher and logs; `space_dict.describe`)."""
        return space_dict.describe(self)


def get_space(space: "SearchSpace | Mapping[str, Any] | str | None" = None) -> SearchSpace:
    """Resolves None (AlphaNet), a name, a dict/ConfigDict or a SearchSpace to a SearchSpace."""
    if space is None:
        return _BUILT["alphanet"]
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
        for f in LIST_FIELDS:
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
        unknown = sorted(map(str, set(d) - {*SUBNET_FIELDS, "width_mult", *_REFERENCE_RESULT_KEYS}))
        if unknown:
            raise SearchSpaceError(f"unknown subnet keys {unknown}; a subnet has {list(SUBNET_FIELDS)} and optionally "
                                   f"'width_mult' (the reference's {list(_REFERENCE_RESULT_KEYS)} are ignored)")
        sp = get_space(space) if space is not None else None
        wm = d.get("width_mult")
        if sp is not None and sp.width_multipliers and wm is not None and any(f not in d for f in LIST_FIELDS):
            template = sp.width_subnet(_num(wm, "width_mult"), resolution=d.get("resolution"))
            d = {**template.to_dict(), **d}
        missing = [f for f in SUBNET_FIELDS if f not in d]
        if missing:
            hint = " (or resolution and width_mult in a width-tied space)" if sp is None or sp.width_multipliers \
                else ""
            raise SearchSpaceError(f"subnet config is missing {missing}; it needs keys {list(SUBNET_FIELDS)}{hint}")
        cfg = cls(**{f: d[f] for f in SUBNET_FIELDS}, width_mult=wm)
        if sp is not None:
            cfg = cfg.canonical(sp)
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

    def canonical(self, space: "SearchSpace | Mapping | str | None" = None) -> "SubnetConfig":
        """The validated subnet, with `width_mult` set (to the declared value) in width-tied spaces."""
        space = get_space(space)
        self.validate(space)
        if not space.width_multipliers:
            return self
        m = space.multiplier_of(self) if self.width_mult is None else space.match_multiplier(self.width_mult)
        return self if self.width_mult == m else self.replace(width_mult=m)

    def validate(self, space: "SearchSpace | Mapping | str | None" = None) -> "SubnetConfig":
        """Raises SearchSpaceError naming the field, position, value and allowed choices."""
        space = get_space(space)
        if self.resolution not in space.resolutions:
            raise SearchSpaceError(f"subnet resolution {self.resolution} is not in space {space.name!r}: "
                                   f"allowed {list(space.resolutions)}")
        for f in LIST_FIELDS:
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


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _num(x: Any, field: str):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:  # numpy scalars
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


_BUILT = {k: SearchSpace.from_config(v) for k, v in SPACES.items()}
