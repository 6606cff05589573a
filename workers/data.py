"""Deterministic draws that do not depend on the shard count: initial parameters,
synthetic inputs and labels, and the per-epoch batch order. numpy only.

Every draw is made in blocks of BLOCK units, block b from its own generator
seeded by (seed, purpose, b). A shard draws only the blocks its units touch, so
any split of the units sees bitwise the same numbers.
"""
from __future__ import annotations

import math

import numpy as np

from workers.models import ModelSpec
from workers.plan import Slice

BLOCK = 256
# Purposes: separate streams from one seed.
INIT, TEACHER, INPUTS, NOISE, ORDER, HOLDOUT = 1, 2, 3, 4, 5, 6


def block_normal(seed: int, purpose: int, units: Slice, width: int) -> np.ndarray:
    """Standard normals for units [begin, end), `width` per unit: shape (units.size, width), float64."""
    out = np.empty((units.size, width))
    if units.size == 0:
        return out
    for b in range(units.begin // BLOCK, (units.end - 1) // BLOCK + 1):
        rows = np.random.default_rng([seed, purpose, b]).standard_normal((BLOCK, width))
        lo, hi = max(units.begin, b * BLOCK), min(units.end, (b + 1) * BLOCK)
        out[lo - units.begin: hi - units.begin] = rows[lo - b * BLOCK: hi - b * BLOCK]
    return out


def init_theta(spec: ModelSpec, units: Slice, has_tail: bool, seed: int, dtype,
               purpose: int = INIT) -> np.ndarray:
    """A shard's initial slice: weights N(0, 1/fan_in) (He for relu), biases zero."""
    D, K, h = spec.n_features, spec.n_outputs, units.size
    tail = np.zeros(K if has_tail else 0)
    if not spec.is_mlp:
        W = block_normal(seed, purpose, units, K) / math.sqrt(D)          # (d, K)
        return np.concatenate([W.ravel(), tail]).astype(dtype)
    R = block_normal(seed, purpose, units, D + K)                          # (h, D+K)
    U = np.zeros((h, spec.unit_size))
    U[:, :D] = R[:, :D] * math.sqrt((2.0 if spec.activation == "relu" else 1.0) / D)
    U[:, D + 1:] = R[:, D:] / math.sqrt(spec.n_hidden)
    return np.concatenate([U.ravel(), tail]).astype(dtype)


def synthetic_inputs(seed: int, rows: int, columns: Slice, dtype) -> np.ndarray:
    """Columns [begin, end) of the synthetic X (rows, D): standard normals, C-contiguous."""
    return np.ascontiguousarray(block_normal(seed, INPUTS, columns, rows).T, dtype=dtype)


def synthetic_labels(spec: ModelSpec, Z_teacher: np.ndarray, seed: int) -> np.ndarray:
    """Labels from the teacher's output (B, K): value + noise, sign, or argmax."""
    if spec.loss == "mse":
        noise = np.random.default_rng([seed, NOISE]).standard_normal(Z_teacher.shape)
        return Z_teacher + 0.1 * noise
    if spec.loss == "bce_logits":
        return (Z_teacher[:, 0] > 0).astype(np.float64)
    return np.argmax(Z_teacher, axis=1).astype(np.int64)


def prepare_labels(spec: ModelSpec, y: np.ndarray, dtype) -> np.ndarray:
    """Check labels against the model and give them the shape and dtype the loss wants."""
    y = np.asarray(y)
    rows = y.shape[0] if y.ndim else 0
    if spec.loss == "mse":
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != spec.n_outputs:
            raise ValueError(f"y must have shape ({rows},) or ({rows}, {spec.n_outputs}) for linear, "
                             f"got {y.shape}")
        y = y.astype(dtype)
        if not np.all(np.isfinite(y)):
            raise ValueError("y has non-finite values")
        return y
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D (rows,) for {spec.kind}, got shape {y.shape}")
    if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
        raise ValueError(f"y must hold integer labels for {spec.kind}")
    if spec.loss == "bce_logits":
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("y must hold 0/1 labels for logistic")
        return y.astype(dtype)
    if y.size and (y.min() < 0 or y.max() >= spec.n_outputs):
        raise ValueError(f"y must hold class labels in [0, {spec.n_outputs}), got [{int(y.min())}, {int(y.max())}]")
    return y.astype(np.int64)


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    return 1 if batch_size <= 0 or batch_size >= n_rows else -(-n_rows // batch_size)


def batch_rows(seed: int, n_rows: int, batch_size: int, step: int) -> tuple[np.ndarray | None, int]:
    """Positions (into the n_rows training rows) of SGD step `step` (0-based), and its epoch.

    None means every row (full batch). Each epoch draws a permutation from (seed,
    epoch) and cuts it into batches of batch_size; the last batch of an epoch holds
    what is left (it may be smaller).
    """
    per_epoch = batches_per_epoch(n_rows, batch_size)
    epoch, k = divmod(step, per_epoch)
    if per_epoch == 1:
        return None, epoch
    order = np.random.default_rng([seed, ORDER, epoch]).permutation(n_rows)
    return order[k * batch_size: (k + 1) * batch_size], epoch


def holdout_split(seed: int, n_rows: int, fraction: float) -> tuple[np.ndarray | None, np.ndarray]:
    """(training rows, held-out rows), both sorted; (None, empty) when nothing is held out.

    floor(fraction * rows) rows, at least 1 when fraction > 0, drawn from (seed, HOLDOUT).
    """
    if not (0 <= fraction < 1):
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    n_out = max(1, int(fraction * n_rows)) if fraction > 0 else 0
    if n_out == 0:
        return None, np.zeros(0, np.int64)
    if n_out >= n_rows:
        raise ValueError(f"holdout_fraction {fraction} leaves no training rows out of {n_rows}")
    order = np.random.default_rng([seed, HOLDOUT]).permutation(n_rows)
    return np.sort(order[n_out:]), np.sort(order[:n_out])
