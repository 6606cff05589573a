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

import numpy as np

from service.errors import ShardUnavailable
from service.jobs import Job
from service.step import StepReport, sgd_step

log = logging.getLogger(__name__)


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

    Returns the replaced shards. Raises ShardUnavailable (and marks the job unusable) when
    a shard cannot be restarted.
    """
    job.shard_epoch += 1              # restored shards keep nothing from an earlier forward
    job.prefetched = None
    job.held_gradient = None          # a restarted shard keeps no gradient; the replay's last step sets it again
    try:
        dead = job.group.replace_dead(job.config.data)
        target, ckpt = job.step, job.checkpoint
        job.group.call("restore", each=[{"state": st} for st in ckpt.states])
        job.step = ckpt.step
        for t in range(ckpt.step, target):
            sgd_step(job, job.lr_log.get(t, 0.0))
        job.node_ids = job.group.node_ids()       # a replaced shard may run on another node
    except Exception as exc:
        job.broken = job.broken or f"a shard died and the job could not be recovered ({exc})"
        raise ShardUnavailable(job.broken) from None
    log.warning("%s: replaced shards %s, restored step %d and replayed to step %d", job.job_id, dead, ckpt.step,
                target, extra={"job_id": job.job_id, "step": target})
    return dead


def recovering_step(job: Job, base_lr: float, store=None, prefetch_next: bool = False) -> StepReport:
    """One optimizer step; a shard that dies during it is replaced and the step retried once."""
    job.lr_log[job.step] = base_lr
    try:
        report = sgd_step(job, base_lr, prefetch_next)
    except ShardUnavailable:
        recover(job)
        report = sgd_step(job, base_lr, prefetch_next)
    if job.config.checkpoint_every and job.step % job.config.checkpoint_every == 0:
        try:
            take_checkpoint(job, store)
        except ShardUnavailable:         # the step is applied: recover to it, then checkpoint it
            recover(job)
            take_checkpoint(job, store)
    return report
