"""Optimizers whose state lives with the parameters they update (one shard's slice).

The update rules are torch.optim's (SGD with momentum/Nesterov, Adam, AdamW), so a
sharded run equals the same optimizer on the whole vector: every rule here is
elementwise, and the only global quantity, the gradient norm for clipping, is
reduced by the coordinator. numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    kind: str = "sgd"
    momentum: float = 0.9        # momentum only
    nesterov: bool = False       # momentum only
    beta1: float = 0.9           # adam, adamw
    beta2: float = 0.999         # adam, adamw
    eps: float = 1e-8            # adam, adamw
    weight_decay: float = 0.0    # sgd/momentum/adam: added to the gradient; adamw: decoupled

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.kind!r}")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"optimizer.eps must be finite and > 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optimizer.weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.nesterov and (self.kind != "momentum" or self.momentum == 0):
            raise ValueError("optimizer.nesterov needs the momentum optimizer with momentum > 0")


class Optimizer:
    """The update of one slice; state arrays are allocated on the first step."""

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config
        self.t = 0                              # updates applied
        self.m: np.ndarray | None = None        # momentum buffer / first moment
        self.v: np.ndarray | None = None        # second moment

    def update(self, theta: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """theta <- one optimizer step from grad (which may be overwritten)."""
        c = self.config
        self.t += 1
        if c.weight_decay and c.kind != "adamw":
            grad += c.weight_decay * theta                     # L2 through the gradient, as torch
        if c.kind == "sgd":
            theta -= lr * grad
        elif c.kind == "momentum":
            if self.m is None:
                self.m = grad.copy()                           # torch: the first buffer is the gradient
            else:
                self.m *= c.momentum
                self.m += grad
            step = grad + c.momentum * self.m if c.nesterov else self.m
            theta -= lr * step
        else:
            if c.kind == "adamw" and c.weight_decay:
                theta *= 1 - lr * c.weight_decay               # decoupled decay, before the moments
            if self.m is None:
                self.m, self.v = np.zeros_like(theta), np.zeros_like(theta)
            self.m *= c.beta1
            self.m += (1 - c.beta1) * grad
            self.v *= c.beta2
            self.v += (1 - c.beta2) * grad * grad
            bias1 = 1 - c.beta1 ** self.t
            bias2 = 1 - c.beta2 ** self.t
            denom = np.sqrt(self.v) / math.sqrt(bias2) + c.eps
            theta -= (lr / bias1) * (self.m / denom)

    def reset(self) -> None:
        self.t, self.m, self.v = 0, None, None
