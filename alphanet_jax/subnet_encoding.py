"""A subnet as the arrays the masked supernet consumes (`EncodedSubnet`, made by `encode`).

Under jit the arrays are traced, so one compiled program per resolution serves every subnet: only
`resolution` is static. Each block's active flag and widths, kernel and SE width come from `resolve`.
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np

from alphanet_jax.resolve import resolve
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space

Array = jax.Array

__all__ = ["EncodedSubnet", "encode"]


@flax.struct.dataclass
class EncodedSubnet:
    """A subnet as arrays (traced under jit); only `resolution` is static."""

    stem: Array          # int32 []
    active: Array        # int32 [num_blocks] 1 if the block runs
    in_ch: Array         # int32 [num_blocks]
    mid: Array           # int32 [num_blocks]
    out_ch: Array        # int32 [num_blocks]
    kernel: Array        # int32 [num_blocks]
    se: Array            # int32 [num_blocks]
    head_expand: Array   # int32 []
    head_width: Array    # int32 []
    head_in: Array       # int32 [] the last stage's active width
    resolution: int = flax.struct.field(pytree_node=False)


def encode(subnet: SubnetConfig | EncodedSubnet, space: SearchSpace | None = None) -> EncodedSubnet:
    """Validates a subnet and turns it into the arrays the supernet consumes."""
    if isinstance(subnet, EncodedSubnet):
        return subnet
    space = get_space(space)
    rs = resolve(subnet, space)
    nb = space.num_blocks
    cols = {k: np.zeros(nb, np.int32) for k in ("active", "in_ch", "mid", "out_ch", "kernel", "se")}
    # Inactive blocks keep harmless values (their branch never runs).
    for b in space.blocks:
        cols["kernel"][b.index] = b.max_kernel
    for b in rs.blocks:
        for k, v in (("active", 1), ("in_ch", b.in_ch), ("mid", b.mid), ("out_ch", b.out_ch),
                     ("kernel", b.kernel), ("se", b.se_mid)):
            cols[k][b.index] = v
    return EncodedSubnet(stem=np.int32(rs.stem_width), head_expand=np.int32(rs.head_expand),
                         head_width=np.int32(rs.head_width), head_in=np.int32(rs.head_in),
                         resolution=subnet.resolution, **cols)
