"""The coordinator: creates jobs and drives the synchronized step over their shards.

One step (DESIGN.md): forward partials -> reduce Z = sum Z_s, loss and dZ here ->
dZ put once -> every shard differentiates (and updates) its own slice. Only
O(batch x outputs) numbers cross per shard; the gradient itself moves only when a
client asks for it (gradient()).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from service.jobs import Job, JobConfig, JobRegistry, resolve
from service.shard_group import RayShardGroup, ShardGroup
from workers.data import batch_rows, prepare_labels, synthetic_labels
from workers.losses import accuracy, loss_and_dZ

log = logging.getLogger(__name__)
_calls = itertools.count(1)   # tokens pairing a shard's forward with its backward


@dataclass
class StepReport:
    step: int
    loss: float
    grad_norm: float
    seconds: float
    shard_seconds: list[float]
    bytes_to_shards: int
    bytes_from_shards: int
    batch_rows: int
    epoch: int
    learning_rate: float


@dataclass
class GradientResult:
    loss: float
    grad: np.ndarray              # flat view (n_params,)
    grad_norm: float
    rows: int
    step: int
    shard_seconds: list[float]


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


@dataclass
class _Forward:
    token: int
    Z: np.ndarray                 # (B, K) summed output
    y: np.ndarray                 # labels of the batch
    penalty: float
    shard_seconds: list[float]
    bytes_to: int
    bytes_from: int


GroupFactory = Callable[..., ShardGroup]


class Coordinator:
    """Jobs and the operations on them; speaks numpy, raises service.errors / ValueError."""

    def __init__(self, group_factory: GroupFactory = RayShardGroup, call_timeout_s: float = 600.0) -> None:
        self.jobs = JobRegistry()
        self._group_factory = group_factory
        self._timeout = call_timeout_s

    # --- jobs -----------------------------------------------------------------------
    def create_job(self, config: JobConfig) -> Job:
        spec, labels = resolve(config)
        plan = spec.plan(config.shards)
        group = self._group_factory(spec, plan, config.dtype, config.seed,
                                    cpus_per_shard=config.cpus_per_shard, timeout_s=self._timeout)
        try:
            group.call("load", config.data)
            if labels is None:   # synthetic: a teacher in the shards labels the rows
                Z = _sum(group.call("teacher_output", config.data.seed))
                labels = prepare_labels(spec, synthetic_labels(spec, Z, config.data.seed), config.dtype)
            job = Job(f"job-{uuid.uuid4().hex[:12]}", config, spec, plan, group, labels, group.node_ids())
        except BaseException:
            group.close()
            raise
        self.jobs.add(job)
        log.info("created %s: %s, %d params, %d shards", job.job_id, spec.kind, spec.n_params, plan.n_shards)
        return job

    def delete_job(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        with job.lock:
            job.group.close()

    def close(self) -> None:
        for job in self.jobs.all():
            self.delete_job(job.job_id)

    # --- parameters -------------------------------------------------------------------
    def get_params(self, job_id: str) -> np.ndarray:
        job = self.jobs.get(job_id)
        with job.lock:
            return np.concatenate(job.group.call("get_params"))

    def set_params(self, job_id: str, named: dict[str, np.ndarray]) -> Job:
        """Replace the tensors given (named, or "flat"); the others keep their values."""
        job = self.jobs.get(job_id)
        with job.lock:
            theta = self._flat_from(job, named, partial=True)
            job.group.call("set_params", each=[{"theta": theta[s.begin:s.end]} for s in job.plan.param_slices()])
            return job

    # --- computations -------------------------------------------------------------------
    def gradient(self, job_id: str, rows: np.ndarray | None = None,
                 params: dict[str, np.ndarray] | None = None) -> GradientResult:
        """Loss and the assembled gradient, at the job's parameters or at `params`."""
        job = self.jobs.get(job_id)
        with job.lock:
            rows = self._check_rows(job, rows)
            theta = self._flat_from(job, params, partial=False) if params else None
            fwd = self._forward(job, rows, theta)
            loss, dZ = loss_and_dZ(job.spec.loss, fwd.Z, fwd.y)
            out = job.group.call("backward", fwd.token, job.group.put(dZ), want_grad=True)
            grad = np.concatenate([g for _, g, _ in out])
            sqnorm = sum(q for q, _, _ in out)
            seconds = [a + b for a, (_, _, b) in zip(fwd.shard_seconds, out)]
            return GradientResult(loss + fwd.penalty, grad, math.sqrt(sqnorm), len(fwd.y), job.step, seconds)

    def step(self, job_id: str, steps: int, learning_rate: float = 0.0) -> Iterator[StepReport]:
        """Run `steps` synchronized SGD steps, yielding a report after each."""
        job = self.jobs.get(job_id)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not (math.isfinite(learning_rate) and learning_rate >= 0):
            raise ValueError(f"learning_rate must be finite and >= 0 (0 = the job's), got {learning_rate}")
        lr = learning_rate or job.config.learning_rate
        for _ in range(steps):
            with job.lock:
                yield self._one_step(job, lr)

    def evaluate(self, job_id: str, rows: np.ndarray | None = None) -> tuple[float, float | None, int, int]:
        """(loss, accuracy or None, rows, step) at the current parameters."""
        job = self.jobs.get(job_id)
        with job.lock:
            fwd = self._forward(job, self._check_rows(job, rows))
            loss, _ = loss_and_dZ(job.spec.loss, fwd.Z, fwd.y, need_grad=False)
            return loss + fwd.penalty, accuracy(job.spec.loss, fwd.Z, fwd.y), len(fwd.y), job.step

    def check_gradient(self, job_id: str, coords_per_shard: int = 0, indices: np.ndarray | None = None,
                       h: float = 0.0, seed: int = 0, rows: np.ndarray | None = None) -> CheckResult:
        """Central differences against the analytic gradient, each shard on its own coordinates."""
        job = self.jobs.get(job_id)
        h = h or 1e-6
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"h must be finite and > 0, got {h}")
        slices = job.plan.param_slices()
        if indices is not None and len(indices):
            indices = np.asarray(indices, np.int64)
            bad = indices[(indices < 0) | (indices >= job.spec.n_params)]
            if bad.size:
                raise ValueError(f"indices must be in [0, {job.spec.n_params}), got {int(bad[0])}")
            local = [np.unique(indices[(indices >= s.begin) & (indices < s.end)]) - s.begin for s in slices]
        else:
            if coords_per_shard < 0:
                raise ValueError(f"coords_per_shard must be >= 0, got {coords_per_shard}")
            count = coords_per_shard or 16
            local = [np.sort(np.random.default_rng([seed, s]).choice(sl.size, min(count, sl.size), replace=False))
                     for s, sl in enumerate(slices)]
        with job.lock:
            fwd = self._forward(job, self._check_rows(job, rows), float64=True)
            y = fwd.y if fwd.y.dtype == np.int64 else fwd.y.astype(np.float64)
            loss, dZ = loss_and_dZ(job.spec.loss, fwd.Z, y)
            put = job.group.put
            out = job.group.call("check", fwd.token, put(fwd.Z), put(dZ), put(y), h=h,
                                 each=[{"indices": ix} for ix in local])
        result = CheckResult(loss + fwd.penalty, h)
        for s, ((analytic, numeric, secs), ix) in enumerate(zip(out, local)):
            result.shards.append(ShardCheckResult(s, ix + slices[s].begin, analytic, numeric, secs))
        return result

    # --- the synchronized step --------------------------------------------------------
    def _one_step(self, job: Job, lr: float) -> StepReport:
        t0 = time.perf_counter()
        rows, epoch = batch_rows(job.config.seed, job.rows, job.config.batch_size, job.step)
        fwd = self._forward(job, rows)
        loss, dZ = loss_and_dZ(job.spec.loss, fwd.Z, fwd.y)
        out = job.group.call("backward", fwd.token, job.group.put(dZ), lr=lr)
        job.step += 1
        S = job.plan.n_shards
        return StepReport(
            step=job.step, loss=loss + fwd.penalty, grad_norm=math.sqrt(sum(q for q, _, _ in out)),
            seconds=time.perf_counter() - t0,
            shard_seconds=[a + b for a, (_, _, b) in zip(fwd.shard_seconds, out)],
            bytes_to_shards=fwd.bytes_to + S * dZ.nbytes, bytes_from_shards=fwd.bytes_from + S * 8,
            batch_rows=len(fwd.y), epoch=epoch, learning_rate=lr)

    def _forward(self, job: Job, rows: np.ndarray | None, theta: np.ndarray | None = None,
                 float64: bool = False) -> _Forward:
        token = next(_calls)
        group = job.group
        each = None
        if theta is not None:
            each = [{"theta": theta[s.begin:s.end]} for s in job.plan.param_slices()]
        out = group.call("forward", token, None if rows is None else group.put(rows), float64=float64, each=each)
        Z = _sum([z for z, _, _ in out])
        S = job.plan.n_shards
        sent = (0 if rows is None else S * rows.nbytes) + (0 if theta is None else theta.nbytes)
        return _Forward(token, Z, job.y if rows is None else job.y[rows], sum(p for _, p, _ in out),
                        [s for _, _, s in out], sent, sum(z.nbytes + 16 for z, _, _ in out))

    def _check_rows(self, job: Job, rows: np.ndarray | None) -> np.ndarray | None:
        if rows is None or len(rows) == 0:
            return None
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise ValueError(f"batch.rows must be integers, got {rows.dtype}")
        bad = rows[(rows < 0) | (rows >= job.rows)]
        if bad.size:
            raise ValueError(f"batch.rows must be in [0, {job.rows}), got {int(bad[0])}")
        return rows.astype(np.int64)

    def _flat_from(self, job: Job, named: dict[str, np.ndarray], partial: bool) -> np.ndarray:
        """The flat vector from client tensors, checked: names, shapes, dtype, finite values."""
        spec, dtype = job.spec, np.dtype(job.config.dtype)
        shapes = spec.tensor_shapes()
        if not named:
            raise ValueError("no tensors were sent")
        for name, array in named.items():
            expected = (spec.n_params,) if name == "flat" else shapes.get(name)
            if expected is None:
                raise ValueError(f"unknown tensor {name!r}; {spec.kind} has {', '.join(shapes)} (or 'flat')")
            if array.dtype != dtype:
                raise ValueError(f"tensor {name} has dtype {array.dtype}, the job uses {dtype}")
            if tuple(array.shape) != expected:
                raise ValueError(f"tensor {name} has shape {tuple(array.shape)}, expected {expected}")
            finite = np.isfinite(array)
            if not finite.all():
                where = tuple(int(i) for i in np.argwhere(~finite)[0])
                raise ValueError(f"tensor {name} has {int((~finite).sum())} non-finite values, first at {where}")
        if "flat" in named:
            if len(named) > 1:
                raise ValueError("send either 'flat' or named tensors, not both")
            return named["flat"]
        if not partial and set(named) != set(shapes):
            missing = sorted(set(shapes) - set(named))
            raise ValueError(f"parameters must include every tensor; missing {', '.join(missing)}")
        if partial and set(named) != set(shapes):
            current = spec.to_named(np.concatenate(job.group.call("get_params")))
            named = {**current, **named}
        return spec.from_named(named, dtype)


def _sum(parts: list[np.ndarray]) -> np.ndarray:
    """Sum partial outputs in shard order (a fixed order keeps results bitwise reproducible)."""
    total = parts[0].astype(np.result_type(*parts), copy=True)
    for p in parts[1:]:
        total += p
    return total
