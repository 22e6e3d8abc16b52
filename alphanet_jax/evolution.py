"""The evolutionary search's operators (spec §9): sampling in a FLOPs window, mutation, crossover, and the
populations they make.

The reference's `sample_active_subnet_within_range`, `mutate_and_reset` and `crossover_and_reset`.
`initial_population` and `next_population` draw a generation's candidates from
`sampling.step_rng(seed, generation, STREAM)` (a fresh `random.Random` per generation, so every host
computes the same candidates and a resumed search replays the same stream); `search.run_search`
evaluates them. Pure Python.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from alphanet_jax.errors import ConfigError, SearchSpaceError
from alphanet_jax.flops import count_flops
from alphanet_jax.sampling import sample_subnet, step_rng
from alphanet_jax.search_config import SearchConfig
from alphanet_jax.search_space import LIST_FIELDS, SearchSpace, SubnetConfig, get_space

STREAM = 9  # step_rng stream of the evolutionary search (distinct from training's sampler)


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


# ----------------------------------------------------------------------------
# Populations
# ----------------------------------------------------------------------------


def _in_window(subnet: SubnetConfig, space: SearchSpace, cfg: SearchConfig,
               latency_fn: Callable[[SubnetConfig], float] | None = None) -> bool:
    return cfg.flops_min <= count_flops(subnet, space) <= cfg.flops_max and _in_budget(subnet, cfg, latency_fn)


def _in_budget(subnet: SubnetConfig, cfg: SearchConfig, latency_fn: Callable[[SubnetConfig], float] | None) -> bool:
    return latency_fn is None or not cfg.max_latency_ms or latency_fn(subnet) <= cfg.max_latency_ms


def check_latency_budget(space: SearchSpace, cfg: SearchConfig, latency_fn: Callable[[SubnetConfig], float]) -> None:
    """A ConfigError when even the min subnet is predicted over `max_latency_ms` (no subnet meets it)."""
    if cfg.max_latency_ms and latency_fn(space.min_subnet()) > cfg.max_latency_ms:
        raise ConfigError(f"search.max_latency_ms = {cfg.max_latency_ms} ms: no subnet meets it, the "
                          f"smallest (min) subnet is predicted at {latency_fn(space.min_subnet()):.3f} ms "
                          f"on this latency table; raise the budget")


def initial_population(space: SearchSpace, cfg: SearchConfig,
                       latency_fn: Callable[[SubnetConfig], float] | None = None) -> list[SubnetConfig]:
    """The min subnet, then parent_popu_size - 1 uniform subnets in the FLOPs window (and latency budget)."""
    rng = step_rng(cfg.seed, 0, STREAM)
    pop = [space.min_subnet()]
    for _ in range(cfg.parent_popu_size - 1):
        for _ in range(cfg.max_resample):
            s = sample_subnet_in_range(space, rng, cfg.flops_min, cfg.flops_max, max_tries=cfg.max_resample)
            if _in_budget(s, cfg, latency_fn):
                break
        else:
            raise ConfigError(f"search.max_latency_ms = {cfg.max_latency_ms} ms: no subnet drawn in the "
                              f"FLOPs window [{cfg.flops_min}, {cfg.flops_max}] met it after "
                              f"{cfg.max_resample} draws; raise the budget or change the window")
        pop.append(s)
    return pop


def next_population(parents: Sequence[SubnetConfig], space: SearchSpace, cfg: SearchConfig,
                    generation: int, latency_fn: Callable[[SubnetConfig], float] | None = None) -> list[SubnetConfig]:
    """mutate_size mutants then crossover_size children of `parents` (the sorted bucket winners),
    each redrawn (parents included) until its MFLOPs are in the window."""
    if not parents:
        raise RuntimeError("the Pareto buckets are empty: no candidate was evaluated with a finite top-1")
    rng = step_rng(cfg.seed, generation, STREAM)
    out: list[SubnetConfig] = []

    def draw(make: Callable[[], SubnetConfig], what: str) -> SubnetConfig:
        for _ in range(cfg.max_resample):
            child = make()
            if _in_window(child, space, cfg, latency_fn):
                return child
        raise RuntimeError(f"no {what} with MFLOPs in [{cfg.flops_min}, {cfg.flops_max}] after "
                           f"{cfg.max_resample} draws (generation {generation})")

    for _ in range(cfg.mutate_size):
        out.append(draw(lambda: mutate(rng.choice(parents), space, rng, cfg.mutate_prob), "mutant"))
    for _ in range(cfg.crossover_size):
        out.append(draw(lambda: crossover(rng.choice(parents), rng.choice(parents), rng), "crossover child"))
    return out
