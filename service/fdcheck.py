"""The finite-difference check: each shard nudges coordinates of its own slice, in parallel."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from service.jobs import Job
from service.step import forward
from workers.losses import loss_and_dZ


@dataclass
class ShardCheckResult:
    shard: int
    indices: np.ndarray           # flat-view indices checked
    analytic: np.ndarray
    numeric: np.ndarray
    seconds: float

    @property
    def abs_error(self) -> np.ndarray:
        return np.abs(self.analytic - self.numeric)

    @property
    def rel_error(self) -> np.ndarray:
        scale = np.maximum(np.maximum(np.abs(self.analytic), np.abs(self.numeric)), 1e-8)
        return self.abs_error / scale


@dataclass
class CheckResult:
    loss: float
    h: float
    shards: list[ShardCheckResult] = field(default_factory=list)


def choose_coordinates(job: Job, coords_per_shard: int, indices: np.ndarray | None, seed: int
                       ) -> list[np.ndarray]:
    """Local indices per shard: the explicit flat indices it owns, or random ones from (seed, shard)."""
    slices = job.plan.param_slices()
    if indices is not None and len(indices):
        indices = np.asarray(indices, np.int64)
        bad = indices[(indices < 0) | (indices >= job.spec.n_params)]
        if bad.size:
            raise ValueError(f"indices must be in [0, {job.spec.n_params}), got {int(bad[0])}")
        return [np.unique(indices[(indices >= s.begin) & (indices < s.end)]) - s.begin for s in slices]
    if coords_per_shard < 0:
        raise ValueError(f"coords_per_shard must be >= 0, got {coords_per_shard}")
    count = coords_per_shard or 16
    return [np.sort(np.random.default_rng([seed, s]).choice(sl.size, min(count, sl.size), replace=False))
            for s, sl in enumerate(slices)]


def check_gradient(job: Job, local: list[np.ndarray], h: float, rows: np.ndarray | None) -> CheckResult:
    """Central differences (L(θ+h e_i) - L(θ-h e_i)) / 2h against the analytic gradient, in float64.

    The caller holds the job's lock.
    """
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"h must be finite and > 0, got {h}")
    fwd = forward(job, rows, float64=True)
    y = fwd.y if fwd.y.dtype == np.int64 else fwd.y.astype(np.float64)
    loss, dZ = loss_and_dZ(job.spec.loss, fwd.Z, y)
    put = job.group.put
    out = job.group.call("check", fwd.token, put(fwd.Z), put(dZ), put(y), h=h,
                         each=[{"indices": ix} for ix in local])
    result = CheckResult(loss + fwd.penalty, h)
    slices = job.plan.param_slices()
    for s, ((analytic, numeric, secs), ix) in enumerate(zip(out, local)):
        result.shards.append(ShardCheckResult(s, ix + slices[s].begin, analytic, numeric, secs))
    return result
