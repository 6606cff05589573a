"""Losses over the summed output Z (B, K): value, dL/dZ, and accuracy. numpy only."""
from __future__ import annotations

import numpy as np

LOSSES = ("mse", "bce_logits", "softmax_ce")


def loss_and_dZ(kind: str, Z: np.ndarray, y: np.ndarray, need_grad: bool = True
                ) -> tuple[float, np.ndarray | None]:
    """Mean loss over the batch rows and, if asked, dL/dZ of the same shape as Z (B, K).

    y: (B, K) floats for mse; (B,) 0/1 for bce_logits (K == 1); (B,) int labels for softmax_ce.
    """
    B = Z.shape[0]
    if kind == "mse":
        R = Z - y                                        # (B, K)
        with np.errstate(over="ignore"):                 # an overflow is reported as loss = inf
            loss = float(np.mean(R * R))
        return loss, (R * (2.0 / R.size)) if need_grad else None
    if kind == "bce_logits":
        z = Z[:, 0]                                      # (B,)
        # log(1 + e^z) - y z, stable for large |z|.
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
        if not need_grad:
            return loss, None
        p = _sigmoid(z)
        return loss, ((p - y) / B)[:, None].astype(Z.dtype, copy=False)
    if kind == "softmax_ce":
        m = Z.max(axis=1, keepdims=True)
        S = Z - m                                        # (B, K) shifted logits
        lse = np.log(np.exp(S).sum(axis=1))              # (B,)
        rows = np.arange(B)
        loss = float(np.mean(lse - S[rows, y]))
        if not need_grad:
            return loss, None
        P = np.exp(S - lse[:, None])                     # softmax (B, K)
        P[rows, y] -= 1.0
        P /= B
        return loss, P
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")


def loss_value(kind: str, Z: np.ndarray, y: np.ndarray) -> float:
    """Mean loss over the batch rows."""
    return loss_and_dZ(kind, Z, y, need_grad=False)[0]


def accuracy(kind: str, Z: np.ndarray, y: np.ndarray) -> float | None:
    """Fraction of rows classified right; None for regression."""
    if kind == "bce_logits":
        return float(np.mean((Z[:, 0] > 0) == (y > 0.5)))
    if kind == "softmax_ce":
        return float(np.mean(np.argmax(Z, axis=1) == y))
    return None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Two branches so that exp never overflows.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out
