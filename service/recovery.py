"""Checkpoints of a job's shards, and recovery from a dead shard by restore + deterministic replay.

Every `checkpoint_every` steps the coordinator copies each shard's state (parameters,
optimizer state, step) into its own memory. When a shard dies, its actor is replaced,
every shard goes back to the checkpoint, and the steps since are run again: batches,
learning rates and arithmetic are the same, so the shards reach bitwise the state they
had (float64 and float32 alike), and the failed step is then retried.
The caller holds the job's lock.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from service.errors import ShardUnavailable
from service.jobs import Job
from service.step import StepReport, begin_sgd_step, sgd_step

log = logging.getLogger(__name__)
# Rounds of one recovery: a shard that dies while the others are restored or replayed (a
# second node lost, a replacement that crashes) begins a new round from the checkpoint.
RECOVERIES = 3


@dataclass
class Checkpoint:
    step: int
    states: list[dict]            # one Shard.state() per shard


def take_checkpoint(job: Job, store=None) -> Checkpoint:
    """Copy every shard's state into the coordinator, and to --state-dir when there is one."""
    # Copies: Ray hands the caller read-only views pinned in its object store.
    states = [{k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in st.items()}
              for st in job.group.call("state")]
    job.checkpoint = Checkpoint(job.step, states)
    job.lr_log = {t: lr for t, lr in job.lr_log.items() if t >= job.step}
    if store is not None:
        store.save_checkpoint(job.job_id, job.step, job.checkpoint.states)
    return job.checkpoint


def recover(job: Job) -> list[int]:
    """Replace dead shards, restore the checkpoint on every shard, replay to the job's step.

    A shard that dies during the restore or the replay starts the recovery again (at most
    RECOVERIES rounds in all): the checkpoint and the steps since are still there.
    Returns the replaced shards. Raises ShardUnavailable (and marks the job unusable) when
    a shard cannot be restarted or the last round fails too.
    """
    job.shard_epoch += 1              # restored shards keep nothing from an earlier forward
    job.prefetched = None
    job.held_gradient = None          # a restarted shard keeps no gradient; the replay's last step sets it again
    target, ckpt, replaced = job.step, job.checkpoint, []
    try:
        for attempt in range(1, RECOVERIES + 1):
            replaced += [s for s in job.group.replace_dead(job.config.data) if s not in replaced]
            try:
                _restore_and_replay(job, ckpt, target)
                break
            except ShardUnavailable as exc:
                if attempt == RECOVERIES:
                    raise
                log.warning("%s: a shard died during its recovery (%s); recovering again", job.job_id, exc,
                            extra={"job_id": job.job_id})
        job.node_ids = job.group.node_ids()       # a replaced shard may run on another node
    except Exception as exc:
        job.broken = job.broken or f"a shard died and the job could not be recovered ({exc})"
        raise ShardUnavailable(job.broken) from None
    log.warning("%s: replaced shards %s, restored step %d and replayed to step %d", job.job_id, replaced, ckpt.step,
                target, extra={"job_id": job.job_id, "step": target})
    return replaced


def _restore_and_replay(job: Job, ckpt: Checkpoint, target: int) -> None:
    """Every shard back to the checkpoint, then the steps since it, to step `target`."""
    job.group.call("restore", each=[{"state": st} for st in ckpt.states])
    job.step = ckpt.step
    for t in range(ckpt.step, target):
        sgd_step(job, job.lr_log.get(t, 0.0))


class StepInFlight:
    """A step whose update call the shards are running (Job.inflight).

    It is settled by whoever holds the job's lock next: the Step or Train call that began it,
    once it has sent its client the previous step's report, or any other call on the job
    before it touches the shards (service.jobs.using). Settling waits for the shards, then
    does what follows a step: the step again if a shard died (begin_step), the periodic
    checkpoint. What it raises is kept for outcome().
    """

    def __init__(self, complete: Callable[[], StepReport]) -> None:
        self._complete = complete
        self._report: StepReport | None = None
        self._error: Exception | None = None
        self.settled = False

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        try:
            self._report = self._complete()
        except Exception as exc:
            self._error = exc

    def outcome(self) -> StepReport:
        """The step's report, or what settling it raised. The caller holds the job's lock."""
        self.settle()
        if self._error is not None:
            raise self._error
        return self._report


def begin_step(job: Job, base_lr: float, store=None, prefetch_next: bool = False) -> StepInFlight:
    """One optimizer step, begun: its update call is running on the shards when this returns.
    A shard that dies during the step is replaced and the step retried once; every
    `checkpoint_every` steps the shards' state is copied. The caller holds the job's lock, and
    keeps it until outcome() or hands the step over through Job.inflight before letting go."""
    job.lr_log[job.step] = base_lr
    try:
        finish = begin_sgd_step(job, base_lr, prefetch_next)
    except ShardUnavailable:
        recover(job)
        report = sgd_step(job, base_lr, prefetch_next)
        return StepInFlight(lambda: _checkpointed(job, report, store))

    def complete() -> StepReport:
        try:
            report = finish()
        except ShardUnavailable:
            recover(job)
            report = sgd_step(job, base_lr, prefetch_next)
        return _checkpointed(job, report, store)
    return StepInFlight(complete)


def _checkpointed(job: Job, report: StepReport, store) -> StepReport:
    """The periodic checkpoint after a step, when it is due."""
    if job.config.checkpoint_every and job.step % job.config.checkpoint_every == 0:
        try:
            take_checkpoint(job, store)
        except ShardUnavailable:         # the step is applied: recover to it, then checkpoint it
            recover(job)
            take_checkpoint(job, store)
    return report
