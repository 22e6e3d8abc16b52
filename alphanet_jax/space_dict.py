"""The dict form of a search space (`spaces.py`, a config's `config.space`): read, written, described.

`read` turns a space name, dict or ConfigDict into the field values of a `search_space.SearchSpace`,
every key checked and width choices derived (`SearchSpace.from_config` builds the space from them
and checks the values); `write` is its inverse (`SearchSpace.to_dict`), `describe` the stage table
for the launcher and logs. Both take a built space. Pure Python.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.spaces import SPACES
from alphanet_jax.widths import scaled_width

SPACE_KEYS = frozenset({"name", "resolutions", "in_channels", "num_classes", "stem", "stages", "head", "act",
                        "se_reduction", "shortcut", "width_multipliers"})
STEM_KEYS = frozenset({"widths", "base_width", "kernel_size", "stride"})
STAGE_KEYS = frozenset({"name", "widths", "base_width", "depths", "kernel_sizes", "expand_ratios", "stride", "se",
                        "act"})
HEAD_KEYS = frozenset({"kind", "widths", "base_width"})  # and 'expand_ratio' for a 'v3' head


def read(cfg: Mapping[str, Any] | str) -> dict[str, Any]:
    """The `SearchSpace` field values of a space name, dict or ConfigDict; `stages` as dicts of `StageSpec`
    fields. Unknown keys and malformed widths raise SearchSpaceError."""
    cfg = _space_dict(cfg)
    name = cfg.get("name", "custom")
    mults = tuple(float(m) for m in (cfg.get("width_multipliers") or ()))
    if any(not m > 0 for m in mults):
        raise SearchSpaceError(f"search space {name!r}: width_multipliers must be positive, got {list(mults)}")
    act = cfg.get("act", "swish")
    stem, head = cfg["stem"], cfg["head"]
    _check_keys(stem, STEM_KEYS, "stem")
    stem_widths, stem_base = _widths_of(stem, "stem", name, mults)
    stages, stage_bases = _read_stages(cfg["stages"], act, name, mults)
    head_kind = head.get("kind", "v3")
    _check_keys(head, HEAD_KEYS | ({"expand_ratio"} if head_kind == "v3" else set()), f"head ({head_kind!r})")
    head_widths, head_base = _widths_of(head, "head", name, mults)
    bases = (stem_base, *stage_bases, head_base)
    if mults and not any(bases):
        raise SearchSpaceError(f"search space {name!r}: width_multipliers given but no stem/stage/head "
                               f"has a 'base_width' to scale")
    return dict(
        name=name, resolutions=_ints(cfg["resolutions"]),
        in_channels=int(cfg.get("in_channels", 3)), num_classes=int(cfg["num_classes"]),
        stem_widths=stem_widths, stem_kernel=int(stem.get("kernel_size", 3)),
        stem_stride=int(stem.get("stride", 2)), stages=stages,
        head_kind=head_kind, head_widths=head_widths,
        head_expand_ratio=int(head.get("expand_ratio", 6)) if head_kind == "v3" else 0, act=act,
        se_reduction=int(cfg.get("se_reduction", 4)), shortcut=cfg.get("shortcut", "always"),
        width_multipliers=mults, width_bases=bases if mults else ())


def write(space: Any) -> dict[str, Any]:
    """The plain-dict form of a built space (`read` reads it back). Width-tied positions are written as
    `base_width`, and `width_multipliers` appears only for width-tied spaces, so AttentiveNAS-style
    spaces keep their original dict."""
    bases = space.width_bases or (0,) * (space.num_stages + 2)

    def w(i: int, choices: tuple[int, ...]) -> dict[str, Any]:
        return dict(base_width=bases[i]) if bases[i] else dict(widths=list(choices))

    head = dict(kind=space.head_kind, **w(space.num_stages + 1, space.head_widths))
    if space.head_kind == "v3":
        head["expand_ratio"] = space.head_expand_ratio
    d = dict(
        name=space.name, resolutions=list(space.resolutions), in_channels=space.in_channels,
        num_classes=space.num_classes,
        stem=dict(**w(0, space.stem_widths), kernel_size=space.stem_kernel, stride=space.stem_stride),
        stages=[dict(name=s.name, **w(i + 1, s.widths), depths=list(s.depths),
                     kernel_sizes=list(s.kernel_sizes), expand_ratios=list(s.expand_ratios),
                     stride=s.stride, se=s.se, act=s.act) for i, s in enumerate(space.stages)],
        head=head, act=space.act, se_reduction=space.se_reduction, shortcut=space.shortcut)
    if space.width_multipliers:
        d["width_multipliers"] = list(space.width_multipliers)
    return d


def describe(space: Any) -> str:
    """A human-readable stage table of a built space (for the launcher and logs)."""
    bases = space.width_bases or (0,) * (space.num_stages + 2)

    def w(i: int, choices: tuple[int, ...]) -> str:
        if bases[i]:
            return f"{bases[i]} x m ({min(choices)}..{max(choices)})"
        return str(list(choices))

    lines = [f"search space {space.name!r}: resolutions {list(space.resolutions)}, "
             f"{space.num_blocks} blocks, {space.num_classes} classes, {space.act}, shortcut {space.shortcut}"]
    if space.width_multipliers:
        lines.append(f"  one width multiplier m per subnet, widths make_divisible(base x m, 8), m in "
                     f"{list(space.width_multipliers)}")
    lines.append(f"  {'stage':<10} {'widths':<22} {'depths':<20} {'kernels':<8} {'expand':<10} s  SE")
    lines.append(f"  {'stem':<10} {w(0, space.stem_widths):<22} {'-':<20} {space.stem_kernel:<8} {'-':<10} "
                 f"{space.stem_stride}  -")
    for i, st in enumerate(space.stages):
        lines.append(f"  {st.name:<10} {w(i + 1, st.widths):<22} {str(list(st.depths)):<20} "
                     f"{str(list(st.kernel_sizes)):<8} {str(list(st.expand_ratios)):<10} {st.stride}  "
                     f"{'yes' if st.se else 'no'}")
    head = w(space.num_stages + 1, space.head_widths)
    if space.head_kind == "v3":
        lines.append(f"  {'head':<10} {head:<22} (v3: final expand x{space.head_expand_ratio}, feature mix)")
    else:
        lines.append(f"  {'head':<10} {head:<22} (v2: 1x1 conv + BN)")
    return "\n".join(lines)


def _space_dict(cfg: Mapping[str, Any] | str) -> dict[str, Any]:
    """The plain dict of a space name, dict or ConfigDict, its top-level keys checked."""
    if isinstance(cfg, str):
        if cfg not in SPACES:
            raise SearchSpaceError(f"unknown search space {cfg!r}; known: {sorted(SPACES)}")
        cfg = SPACES[cfg]
    cfg = _to_plain(cfg)
    unknown = set(cfg) - SPACE_KEYS
    if unknown:
        raise SearchSpaceError(f"unknown search-space keys {sorted(unknown)}; allowed: {sorted(SPACE_KEYS)}")
    return cfg


def _check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    bad = set(d) - set(allowed)
    if bad:
        raise SearchSpaceError(f"{where}: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")


def _widths_of(d: Mapping[str, Any], where: str, space_name: str, mults: tuple[float, ...]
               ) -> tuple[tuple[int, ...], int]:
    """The width choices of a stem, stage or head dict and its base width (0 unless tied to the multiplier)."""
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


def _read_stages(stage_dicts: Sequence[Mapping[str, Any]], act: str, space_name: str, mults: tuple[float, ...]
                 ) -> tuple[tuple[dict[str, Any], ...], tuple[int, ...]]:
    """The `StageSpec` fields of each stage dict, and their base widths (0 where not tied)."""
    stages, bases = [], []
    for i, st in enumerate(stage_dicts):
        _check_keys(st, STAGE_KEYS, f"stage {i}")
        name = st.get("name", f"stage{i + 1}")
        widths, base = _widths_of(st, f"stage {name}", space_name, mults)
        bases.append(base)
        stages.append(dict(
            name=name, widths=widths, depths=_ints(st["depths"]),
            kernel_sizes=_ints(st["kernel_sizes"]), expand_ratios=tuple(st["expand_ratios"]),
            stride=int(st["stride"]), se=bool(st["se"]), act=st.get("act", act)))
    return tuple(stages), tuple(bases)


def _ints(xs: Iterable[Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in xs)


def _to_plain(cfg: Any) -> Any:
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: _to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_to_plain(v) for v in cfg]
    return cfg
