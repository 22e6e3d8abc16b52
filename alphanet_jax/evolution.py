"""The evolutionary search's operators (spec §9): sampling in a FLOPs window, mutation, crossover.

The reference's `sample_active_subnet_within_range`, `mutate_and_reset` and `crossover_and_reset`;
`search.run_search` drives them with `sampling.step_rng(seed, generation, STREAM)`. Pure Python.
"""

from __future__ import annotations

import random

from alphanet_jax.errors import SearchSpaceError
from alphanet_jax.flops import count_flops
from alphanet_jax.sampling import sample_subnet
from alphanet_jax.search_space import LIST_FIELDS, SearchSpace, SubnetConfig, get_space


def sample_subnet_in_range(space: SearchSpace, rng: random.Random, min_flops: float, max_flops: float,
                           max_tries: int = 100_000) -> SubnetConfig:
    """Rejection sampling until min_flops <= MFLOPs <= max_flops (reference: no try limit)."""
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
    fields = LIST_FIELDS
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
        fields = LIST_FIELDS[1:]
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
                 for f in LIST_FIELDS[1:]}
        return SubnetConfig(resolution=res, width=src.width, width_mult=src.width_mult, **lists)
    lists = {f: [x if rng.random() < p else y for x, y in zip(getattr(a, f), getattr(b, f))]
             for f in LIST_FIELDS}
    return SubnetConfig(resolution=res, **lists)
