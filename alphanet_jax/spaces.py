"""The search spaces, as plain data.

Plain dicts (the slimmable stages written as MobileNetV2's (t, c, n, s) table):
`search_space.SearchSpace.from_config` reads a space dict (`space_dict.read` checks it; the space
derives its structure). Configs in configs/ embed a space dict as `config.space`, so a config file
can define its own space. The A0..A6 subnets are in `presets`.

Two families: AttentiveNAS-style spaces (every width, depth, kernel and expand ratio an independent
gene: `alphanet`, `tiny`) and width-tied slimmable spaces (`slimmable_mobilenet_v2`, `tiny_slimmable`:
one width multiplier per subnet, widths make_divisible(base x m, 8)).
"""

from __future__ import annotations

from typing import Any

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


def _inverted_residual_stages(table: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    """Stage dicts 'ir1', 'ir2', ... from MobileNetV2's (t, c, n, s) rows: expand ratio, base width, depth,
    stride; one choice each, 3x3 kernels, no SE."""
    return [dict(name=f"ir{i + 1}", base_width=c, depths=[n], kernel_sizes=[3], expand_ratios=[t], stride=s, se=False)
            for i, (t, c, n, s) in enumerate(table)]


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
    stages=_inverted_residual_stages([(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                      (6, 160, 3, 2), (6, 320, 1, 1)]),
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
    stages=_inverted_residual_stages([(1, 16, 1, 1), (3, 24, 2, 2), (3, 32, 2, 2), (3, 48, 1, 1)]),
    head=dict(kind="v2", widths=[128]),
    act="relu6",
    se_reduction=4,
    shortcut="identity_when_same",
)

SPACES: dict[str, dict[str, Any]] = {"alphanet": ALPHANET_SPACE, "tiny": TINY_SPACE,
                                     "slimmable_mobilenet_v2": SLIMMABLE_MOBILENET_V2_SPACE,
                                     "tiny_slimmable": TINY_SLIMMABLE_SPACE}
