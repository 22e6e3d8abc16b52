"""A subnet resolved to its active blocks and channel counts (spec §3): what FLOPs counting, the
supernet's masks and the export all read. Pure Python.
"""

from __future__ import annotations

import dataclasses

from alphanet_jax.search_space import SubnetConfig, get_space
from alphanet_jax.widths import expanded_width, se_width


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
            se_mid = se_width(mid, space.se_reduction) if st.se else 0
            blocks.append(ActiveBlock(index=gi, stage=si, stride=st.stride if pos == 0 else 1, in_ch=c_in,
                                      mid=mid, out_ch=c_out, kernel=k, se_mid=se_mid, has_expand=st.has_expand,
                                      act=st.act, shortcut_mode=space.shortcut))
            c_in = c_out
    head_expand = (subnet.width[-1] if space.head_kind == "v2"
                   else space.head_expand_ratio * subnet.width[-2])
    return ResolvedSubnet(resolution=subnet.resolution, stem_width=subnet.width[0], blocks=tuple(blocks),
                          head_expand=head_expand, head_width=subnet.width[-1], head_in=subnet.width[-2])
