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
        self._first = False                     # the update in progress is the first (state just made)

    def update(self, theta: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """theta <- one optimizer step from grad."""
        self.begin(theta)
        self.update_block(theta, grad, lr, slice(None))

    def begin(self, theta: np.ndarray) -> tuple[int, bool]:
        """Start update number t + 1, to be applied block by block with update_block().

        Every rule is elementwise, so updating the blocks of a partition one after the
        other gives bitwise what update() gives. Returns what rollback() needs.
        """
        before = (self.t, self.m is None)
        self.t += 1
        self._first = self.m is None
        if self._first and self.config.kind == "momentum":
            self.m = np.empty_like(theta)                      # filled from the gradient, block by block
        elif self._first and self.config.kind in ("adam", "adamw"):
            self.m, self.v = np.zeros_like(theta), np.zeros_like(theta)
        return before

    def rollback(self, before: tuple[int, bool]) -> None:
        """Undo begin(); the caller restores the blocks it already updated."""
        self.t, first = before
        if first:
            self.m = self.v = None

    def update_block(self, theta: np.ndarray, grad: np.ndarray, lr: float, block: slice) -> None:
        """The update begun by begin() on theta[block] from grad[block]."""
        c = self.config
        th, g = theta[block], grad[block]
        if c.weight_decay and c.kind != "adamw":
            g = g + c.weight_decay * th                        # L2 through the gradient, as torch (grad is kept)
        if c.kind == "sgd":
            th -= lr * g
        elif c.kind == "momentum":
            m = self.m[block]
            if self._first:
                m[...] = g                                     # torch: the first buffer is the gradient
            else:
                m *= c.momentum
                m += g
            step = g + c.momentum * m if c.nesterov else m
            th -= lr * step
        else:
            if c.kind == "adamw" and c.weight_decay:
                th *= 1 - lr * c.weight_decay                  # decoupled decay, before the moments
            m, v = self.m[block], self.v[block]
            m *= c.beta1
            m += (1 - c.beta1) * g
            v *= c.beta2
            v += (1 - c.beta2) * g * g
            bias1 = 1 - c.beta1 ** self.t
            bias2 = 1 - c.beta2 ** self.t
            denom = np.sqrt(v) / math.sqrt(bias2) + c.eps
            th -= (lr / bias1) * (m / denom)

    def reset(self) -> None:
        self.t, self.m, self.v = 0, None, None
