"""The evolutionary search's settings (`SearchConfig`, spec §9): population sizes, the FLOPs window,
the objective (MFLOPs or predicted latency) and its bucket step. Pure Python; `search` runs them."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["SearchConfig", "default_config", "OBJECTIVES"]

OBJECTIVES = {"flops": "mflops", "latency": "latency_ms"}  # objective -> the row field it buckets


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The evo-search settings. Defaults: `AlphaNet:configs/parallel_supernet_evo_search.yml`'s
    realistic sizes (its comments: 512 / 128 / 128), window [200, 1200], step 10."""

    parent_popu_size: int = 512
    mutate_size: int = 128
    crossover_size: int = 128
    mutate_prob: float = 0.2
    evo_iter: int = 20
    flops_min: float = 200.0
    flops_max: float = 1200.0
    flops_step: float = 10.0
    seed: int = 0
    max_resample: int = 100_000  # tries per child before giving up (the reference loops forever)
    # objective "latency": buckets of `latency_step` ms of predicted latency (a latency table, see
    # `latency_measure`) instead of MFLOPs, and candidates over `max_latency_ms` (0: no budget) rejected.
    objective: str = "flops"
    max_latency_ms: float = 0.0
    latency_step: float = 1.0

    @classmethod
    def from_any(cls, cfg: Any) -> "SearchConfig":
        if isinstance(cfg, SearchConfig):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        cfg = dict(cfg or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown search config keys {unknown}; allowed: {sorted(allowed)}")
        out = cls(**cfg)
        out.check()
        return out

    def check(self) -> None:
        for k in ("parent_popu_size", "evo_iter"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"search config {k} must be >= 1, got {getattr(self, k)}")
        for k in ("mutate_size", "crossover_size"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"search config {k} must be >= 0, got {getattr(self, k)}")
        if self.evo_iter > 1 and self.mutate_size + self.crossover_size < 1:
            raise ValueError("mutate_size + crossover_size must be >= 1 when evo_iter > 1")
        if not 0.0 <= self.mutate_prob <= 1.0:
            raise ValueError(f"mutate_prob must be in [0, 1], got {self.mutate_prob}")
        if self.flops_min > self.flops_max:
            raise ValueError(f"empty FLOPs window: flops_min {self.flops_min} > flops_max {self.flops_max}")
        if not self.flops_step > 0:
            raise ValueError(f"flops_step must be > 0, got {self.flops_step}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if not (isinstance(self.max_latency_ms, (int, float)) and self.max_latency_ms >= 0):
            raise ValueError(f"max_latency_ms must be a number >= 0 (0: no budget), got {self.max_latency_ms!r}")
        if not (isinstance(self.latency_step, (int, float)) and self.latency_step > 0):
            raise ValueError(f"latency_step must be > 0, got {self.latency_step!r}")

    @property
    def cost_key(self) -> str:
        """The row field that the buckets, the front and the plot use: mflops or latency_ms."""
        return OBJECTIVES[self.objective]

    @property
    def bucket_step(self) -> float:
        return self.latency_step if self.objective == "latency" else self.flops_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config():
    """An ml_collections ConfigDict with the defaults of `SearchConfig`."""
    import ml_collections

    return ml_collections.ConfigDict(SearchConfig().to_dict())
