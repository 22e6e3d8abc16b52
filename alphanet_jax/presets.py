"""Subnets by name: the AlphaNet A0..A6 presets, 'min'/'max', width multipliers ('0.5x'), JSON files.

`as_subnet` is what the command line calls for `eval.subnets` and `export.subnet`. Pure Python.
The presets' genes are data, in presets.json.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, Mapping

from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.search_space import SubnetConfig, get_space

# AlphaNet A0..A6 (spec §5.2, the reference's `AlphaNet:configs/eval_alphanet_models.yml`), as data in
# presets.json: each entry is a subnet in the reference's dict format (what `load_subnet` reads).
# Keys follow the reference: a5 is A5-small, a5_1 is A5-base.
PRESETS: dict[str, dict[str, Any]] = json.loads(
    importlib.resources.files("alphanet_jax").joinpath("presets.json").read_text())
PRESET_ALIASES = {"a5_small": "a5", "a5_base": "a5_1"}
PRESET_TITLES = {"a0": "AlphaNet-A0", "a1": "AlphaNet-A1", "a2": "AlphaNet-A2", "a3": "AlphaNet-A3",
                 "a4": "AlphaNet-A4", "a5": "AlphaNet-A5 (small)", "a5_1": "AlphaNet-A5 (base)", "a6": "AlphaNet-A6"}


def as_subnet(subnet: "SubnetConfig | Mapping | str", space=None) -> SubnetConfig:
    """A SubnetConfig from a config, a dict, a preset name or a JSON file path; validated."""
    space = get_space(space)
    if isinstance(subnet, SubnetConfig):
        return subnet.canonical(space)
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
