"""Learning-rate schedules: the rate of step t (0-based) from the base rate. numpy-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    warmup_steps: int = 0     # linear warm-up: step t < warmup uses base * (t + 1) / warmup
    step_size: int = 0        # step: multiply by gamma every step_size steps (after warm-up)
    gamma: float = 0.1        # step
    total_steps: int = 0      # cosine: steps from the end of warm-up to min_lr
    min_lr: float = 0.0       # cosine

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "step" and self.step_size < 1:
            raise ValueError(f"schedule.step_size must be >= 1 for the step schedule, got {self.step_size}")
        if self.kind == "step" and not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"schedule.gamma must be finite and > 0, got {self.gamma}")
        if self.kind == "cosine" and self.total_steps < 1:
            raise ValueError(f"schedule.total_steps must be >= 1 for cosine, got {self.total_steps}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ValueError(f"schedule.min_lr must be finite and >= 0, got {self.min_lr}")

    def lr(self, base: float, t: int) -> float:
        """Learning rate of step t (0-based)."""
        if t < self.warmup_steps:
            return base * (t + 1) / self.warmup_steps
        t -= self.warmup_steps
        if self.kind == "step":
            return base * self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            progress = min(t, self.total_steps) / self.total_steps
            return self.min_lr + (base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return base
