"""Channel widths: the reference's rounding to multiples of 8, tied widths, a block's expanded width.

Pure arithmetic, no imports: the space reader (`space_dict`), the schema (`search_space`: the
supernet's maximum shapes) and `resolve` (a subnet's active channels) all round with these.
"""

from __future__ import annotations


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


def expanded_width(c_in: int, t: float) -> int:
    """A block's hidden width for input width `c_in` and expand ratio `t`: make_divisible(round(c_in t), 8)
    (spec §3.3); `resolve` and the supernet's tensor sizes (`SearchSpace.blocks`) both use it."""
    return make_divisible(round(c_in * t), 8)


def se_width(mid: int, se_reduction: int) -> int:
    """The SE hidden width of a block with hidden width `mid`: make_divisible(mid // reduction, 8)."""
    return make_divisible(mid // se_reduction, 8)
