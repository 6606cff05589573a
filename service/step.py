"""The synchronized step of DESIGN.md, as functions of one Job (the caller holds its lock).

forward: every shard returns Z_s; the coordinator sums them in shard order.
step:    loss and dZ here -> dZ put once -> every shard differentiates and updates its
         own slice. With global-norm clipping the shards first report |g_s|^2 and then
         receive one scale factor, so the result equals clipping the full gradient.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from service.errors import FailedPrecondition, ShardUnavailable
from service.jobs import Job
from workers.data import batch_rows
from workers.losses import loss_and_dZ

_calls = itertools.count(1)   # tokens pairing a shard's forward with its backward


@dataclass
class Forward:
    token: int
    Z: np.ndarray                 # (B, K) summed output
    y: np.ndarray                 # labels of the batch
    penalty: float                # L2 term of the loss, summed over shards
    shard_seconds: list[float]
    bytes_to: int
    bytes_from: int


@dataclass
class Prefetch:
    """A forward done by the shards at the end of the previous step's update call."""

    step: int                     # the job step (0-based) it is the forward of
    shard_epoch: int              # valid only while no other call has touched the shards
    forward: Forward


@dataclass
class StepReport:
    step: int                     # the job's step after this one
    loss: float                   # before the update, on this step's batch
    grad_norm: float              # before clipping
    seconds: float
    shard_seconds: list[float]
    bytes_to_shards: int
    bytes_from_shards: int
    batch_rows: int
    epoch: int
    learning_rate: float
    clip_scale: float = 1.0


def sum_partials(parts: list[np.ndarray]) -> np.ndarray:
    """Sum partial outputs in shard order (a fixed order keeps results bitwise reproducible)."""
    total = parts[0].astype(np.result_type(*parts), copy=True)
    for p in parts[1:]:
        total += p
    return total


def check_rows(job: Job, rows: np.ndarray | None) -> np.ndarray | None:
    """Client row indices, checked; None (every row) for an empty list."""
    if rows is None or len(rows) == 0:
        return None
    rows = np.asarray(rows)
    if len(rows) > job.rows:
        raise ValueError(f"batch.rows holds {len(rows)} indices; at most {job.rows} (the rows of the data) "
                         f"are allowed")
    if rows.dtype.kind not in "iu":
        raise ValueError(f"batch.rows must be integers, got {rows.dtype}")
    bad = rows[(rows < 0) | (rows >= job.rows)]
    if bad.size:
        raise ValueError(f"batch.rows must be in [0, {job.rows}), got {int(bad[0])}")
    return rows.astype(np.int64)


def forward(job: Job, rows: np.ndarray | None, theta: np.ndarray | None = None, float64: bool = False,
            keep: bool = True, step_batch: bool = False) -> Forward:
    """Partial outputs of every shard on `rows` (None: all), summed; at `theta` if given.

    keep=False tells the shards not to keep what a backward would need (evaluation);
    step_batch that `rows` is a training step's batch (the shards gather it into kept memory).
    """
    job.shard_epoch += 1          # whatever the shards kept from an earlier forward is gone
    token = next(_calls)
    group = job.group
    each = None
    if theta is not None:
        each = [{"theta": theta[s.begin:s.end]} for s in job.plan.param_slices()]
    out = group.call("forward", token, None if rows is None else group.put(rows), float64=float64, keep=keep,
                     step_batch=step_batch, each=each)
    return _gathered(job, token, rows, out, extra_sent=0 if theta is None else theta.nbytes)


def _gathered(job: Job, token: int, rows: np.ndarray | None, out: list[tuple], extra_sent: int = 0) -> Forward:
    """A Forward from the shards' (Z_s, penalty, seconds) answers to the forward `token` on `rows`."""
    sent = (0 if rows is None else job.plan.n_shards * rows.nbytes) + extra_sent
    return Forward(token, sum_partials([z for z, _, _ in out]), job.y if rows is None else job.y[rows],
                   sum(p for _, p, _ in out), [s for _, _, s in out], sent,
                   sum(z.nbytes + 16 for z, _, _ in out))


def step_rows(job: Job, step: int) -> tuple[np.ndarray | None, int]:
    """Rows of the job's step `step` (0-based) and its epoch; the training rows only."""
    positions, epoch = batch_rows(job.config.seed, job.n_train, job.config.batch_size, step)
    if positions is None:
        return job.train_rows, epoch
    return (positions if job.train_rows is None else job.train_rows[positions]), epoch


def sgd_step(job: Job, base_lr: float = 0.0, prefetch_next: bool = False) -> StepReport:
    """One synchronized optimizer step; base_lr overrides the job's learning rate when > 0.

    prefetch_next: the update call also runs the next step's forward (the caller will run
    that step next), saving a round trip; it is used only if nothing touched the shards since.
    """
    return begin_sgd_step(job, base_lr, prefetch_next)()


def begin_sgd_step(job: Job, base_lr: float = 0.0, prefetch_next: bool = False) -> Callable[[], StepReport]:
    """sgd_step() in two halves: returns once the shards run the step's update call (the
    longest part of a step: backward, update and the next forward), with the function that
    waits for them and gives the step's report. In between the caller may do other work, such
    as sending the previous step's report to its client, but nothing that reaches the shards.
    """
    t0 = time.perf_counter()
    t = job.step
    lr = job.schedule.lr(base_lr or job.config.learning_rate, t)
    rows, epoch = step_rows(job, t)
    ready, job.prefetched = job.prefetched, None
    if ready is not None and ready.step == t and ready.shard_epoch == job.shard_epoch:
        fwd = ready.forward
    else:
        fwd = forward(job, rows, step_batch=True)
    loss, dZ = loss_and_dZ(job.spec.loss, fwd.Z, fwd.y)
    if not (math.isfinite(loss) and np.all(np.isfinite(dZ))):
        raise FailedPrecondition(f"the loss is {loss} at step {t + 1} (learning rate {lr:g}); nothing was applied. "
                                 f"Set finite parameters or use a smaller learning rate")
    job.held_gradient = None      # the shards' kept gradients change now; known again once the step is applied
    with _breaking(job, t):
        finish = _begin_update(job, t, lr, loss, fwd, dZ, epoch, t0, prefetch_next)

    def finished() -> StepReport:
        with _breaking(job, t):
            job.held_gradient = finish()
        return job.held_gradient
    return finished


@contextlib.contextmanager
def _breaking(job: Job, t: int) -> Iterator[None]:
    """A failure in the shards during step t + 1 leaves the job unusable, unless a shard died."""
    try:
        yield
    except ShardUnavailable:
        raise      # a dead shard: service.recovery restores a consistent state
    except Exception as exc:
        # Some shards may have applied the step and others not: the job cannot go on.
        job.broken = f"step {t + 1} failed in the shards ({type(exc).__name__}: {exc})"
        raise


def _begin_update(job: Job, t: int, lr: float, loss: float, fwd: Forward, dZ: np.ndarray, epoch: int,
                  t0: float, prefetch_next: bool) -> Callable[[], StepReport]:
    group, S = job.group, job.plan.n_shards
    dZ_ref = group.put(dZ)
    nxt, next_rows = {}, None
    if prefetch_next:
        next_rows, _ = step_rows(job, t + 1)
        nxt = {"next_token": next(_calls), "next_rows": None if next_rows is None else group.put(next_rows)}
    if job.config.clip_norm > 0:
        out = group.call("backward", fwd.token, dZ_ref)
        norm = math.sqrt(sum(q for q, _, _ in out))
        scale = min(1.0, job.config.clip_norm / (norm + 1e-6))       # as torch's clip_grad_norm_
        applying = group.start("apply", t + 1, lr, scale, **nxt)

        def applied() -> tuple:
            answers = applying()
            seconds = [f + b + a for f, (_, _, b), (a, _) in zip(fwd.shard_seconds, out, answers)]
            return norm, scale, seconds, [p for _, p in answers], S * 16, S * 8   # (step, lr, scale) out; seconds back
    else:
        updating = group.start("backward_apply", fwd.token, dZ_ref, t + 1, lr, **nxt)

        def applied() -> tuple:
            answers = updating()
            seconds = [f + b for f, (_, _, b, _) in zip(fwd.shard_seconds, answers)]
            return math.sqrt(sum(q for q, _, _, _ in answers)), 1.0, seconds, [p for _, _, _, p in answers], 0, 0

    def finish() -> StepReport:
        norm, scale, seconds, prefetched, extra_to, extra_from = applied()
        job.step = t + 1
        if prefetch_next:
            job.prefetched = Prefetch(t + 1, job.shard_epoch,
                                      _gathered(job, nxt["next_token"], next_rows, prefetched))
        return StepReport(step=job.step, loss=loss + fwd.penalty, grad_norm=norm, seconds=time.perf_counter() - t0,
                          shard_seconds=seconds, bytes_to_shards=fwd.bytes_to + S * dZ.nbytes + extra_to,
                          bytes_from_shards=fwd.bytes_from + S * 16 + extra_from, batch_rows=len(fwd.y),
                          epoch=epoch, learning_rate=lr, clip_scale=scale)
    return finish
