"""Drawing subnets for training: the sandwich rule's subnets of a step (spec §4.2, §6.1).

Randomness always comes from an explicit random.Random; `step_rng(seed, step)` gives the same
generator on every host and process, so every device draws the same subnets. Pure Python.
"""

from __future__ import annotations

import random

from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.search_space import SearchSpace, SubnetConfig, get_space


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
    """A uniform random subnet, drawn in the reference's order (resolution, widths, depths, kernels, expands);
    in a width-tied space one multiplier for every tied width."""
    return get_space(space).pick_subnet(rng.choice)


def sandwich_subnets(space: SearchSpace, seed: int, step: int, num_arch_training: int = 4
                     ) -> list[SubnetConfig]:
    """The subnets of one sandwich step: max, (n-2) uniform random, min (spec §6.1)."""
    space = get_space(space)
    if num_arch_training < 2:
        raise SearchSpaceError(f"num_arch_training must be >= 2 (max and min), got {num_arch_training}")
    rng = step_rng(seed, step)
    middle = [sample_subnet(space, rng) for _ in range(num_arch_training - 2)]
    return [space.max_subnet(), *middle, space.min_subnet()]
