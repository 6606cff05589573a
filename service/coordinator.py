"""The coordinator: jobs, and the operations on them over their shards.

It speaks numpy and raises service.errors or ValueError; the servicer maps those to
gRPC status codes. The step protocol itself is in service.step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np

from service.datasets import DatasetStore
from service.fdcheck import CheckResult, check_gradient, choose_coordinates
from service.errors import Aborted, FailedPrecondition, NotFound, ShardUnavailable, Unavailable
from service.metrics import Metrics
from service.jobs import (DELETED, STOPPING, Job, JobConfig, JobRegistry, Limits, admit, check_room, resolve, settle,
                          using)
from service.params import flat_from
from service.shard_group import RayShardGroup, ShardGroup
from service.state import StateStore
from service.recovery import StepInFlight, begin_step, recover, take_checkpoint
from service.step import StepReport, check_rows, forward, sum_partials
from workers.data import batches_per_epoch, prepare_labels, synthetic_labels
from workers.losses import accuracy, loss_and_dZ
from workers.shard import DataSpec

log = logging.getLogger(__name__)
SPLITS = ("all", "train", "holdout")
T = TypeVar("T")


def private_copies(pieces: list[np.ndarray]) -> list[np.ndarray]:
    """The default read of lent slices (ShardGroup.lend): arrays of the caller's own. A slice
    read off a line into fresh memory, or an in-process shard's copy, is already the caller's
    (writeable); a view of a shard's memory, or of Ray's object store, is read-only: copied."""
    return [p if p.flags.writeable else np.array(p) for p in pieces]


def _read_lent(read: Callable[[list[np.ndarray]], T], lent: list[np.ndarray]) -> T:
    """read(lent), refusing a result that is still a view of the lent slices: the shards'
    live memory must not outlive the job's lock."""
    out = read(lent)
    for o in out if isinstance(out, list) else [out]:
        if isinstance(o, np.ndarray) and any(np.may_share_memory(o, v) for v in lent if not v.flags.writeable):
            raise RuntimeError(f"{getattr(read, '__name__', read)!r} kept a view of a shard's memory; copy it")
    return out


@dataclass
class GradientResult:
    loss: float
    pieces: list                  # the shards' slices of the flat gradient, in order
                                  # (held_gradient: what its `read` made of them)
    grad_norm: float
    rows: int
    step: int
    shard_seconds: list[float]
    applied_step: int = 0         # held_gradient: the step that applied it (0: a gradient computed on request)
    clip_scale: float = 0.0       # held_gradient: the factor global-norm clipping scaled it by (0: computed on request)

    @functools.cached_property
    def grad(self) -> np.ndarray:
        """The flat gradient (n_params,); the servicer streams the pieces instead of joining them."""
        return np.concatenate(self.pieces)


@dataclass
class Evaluation:
    loss: float
    accuracy: float | None        # None for regression
    rows: int
    step: int


@dataclass
class TrainEvent:
    report: StepReport
    total_steps: int              # steps this Train call runs
    examples_per_second: float    # training rows per second over this call so far
    evaluation: Evaluation | None  # on the held-out rows, every eval_every steps


GroupFactory = Callable[..., ShardGroup]


class Coordinator:
    """Jobs and the operations on them."""

    def __init__(self, group_factory: GroupFactory = RayShardGroup, call_timeout_s: float = 600.0,
                 datasets: DatasetStore | None = None, limits: Limits = Limits(),
                 placement_timeout_s: float = 30.0, metrics: Metrics | None = None,
                 state: StateStore | None = None) -> None:
        self.jobs = JobRegistry()
        self.state = state
        self.ready = True            # serve() holds calls off (UNAVAILABLE) while it resumes jobs
        self.metrics = metrics
        self._placement_timeout = placement_timeout_s
        self.limits = limits
        self.datasets = datasets or DatasetStore(None, max_bytes=8 << 30)
        self._group_factory = group_factory
        self._timeout = call_timeout_s

    # --- jobs -----------------------------------------------------------------------
    def create_job(self, config: JobConfig, job_id: str | None = None, resume: tuple | None = None) -> Job:
        """Start a job's shards. resume=(step, shard states) restarts a saved job at its checkpoint."""
        if config.data.kind == "dataset":   # an uploaded set: its file, read like any .npz
            config = dataclasses.replace(config, data=DataSpec("npz", path=self.datasets.get(config.data.path).path,
                                                               dataset_id=config.data.path))
        self.jobs.refuse_if_stopping("create the job again")     # before starting any shard
        check_room(self.jobs.count(), self.limits.max_jobs)      # refuse before starting any shard
        spec, labels = resolve(config, self.limits)
        plan = spec.plan(config.shards)
        group = self._group_factory(spec, plan, config.dtype, config.seed, optimizer=config.optimizer,
                                    cpus_per_shard=config.cpus_per_shard, timeout_s=self._timeout,
                                    placement=config.placement, placement_timeout_s=self._placement_timeout)
        try:
            group.call("load", config.data)
            if labels is None:   # synthetic: a teacher in the shards labels the rows
                Z = sum_partials(group.call("teacher_output", config.data.seed))
                labels = prepare_labels(spec, synthetic_labels(spec, Z, config.data.seed), config.dtype)
            job = Job(job_id or f"job-{uuid.uuid4().hex[:12]}", config, spec, plan, group, labels,
                      group.node_ids())
            if resume is not None:
                job.step = resume[0]
                group.call("restore", each=[{"state": st} for st in resume[1]])
            take_checkpoint(job)                               # what a recovery starts from
            self.jobs.add(job, self.limits.max_jobs)           # authoritative, under the registry's lock
        except BaseException:
            group.close()
            raise
        if resume is None and self.state is not None:         # on disk only once the job is accepted
            try:
                self.state.save_job(job.job_id, config, job.created_ns)
                self.state.save_checkpoint(job.job_id, job.step, job.checkpoint.states)
            except BaseException:
                with contextlib.suppress(NotFound, Unavailable):    # close() may have taken it meanwhile
                    self.jobs.pop(job.job_id)
                group.close()
                self.state.delete_job(job.job_id)
                raise
        if self.metrics:
            self.metrics.job_created(job.job_id, plan.n_shards)
        log.info("created %s: %s, %d params, %d shards", job.job_id, spec.kind, spec.n_params, plan.n_shards,
                 extra={"job_id": job.job_id})
        return job

    def shard_steps(self, job_id: str, wait: bool = True) -> list[int]:
        """Each shard's own count of applied optimizer steps; -1 each when the job is unusable.

        wait=False (ListJobs): while a call holds the job or a step is in flight, answer the
        job's step for every shard — what they all had applied when the last step finished —
        instead of waiting for the shards. GetJob waits, so that a client reading its job after
        a call it made (or cancelled) sees that call's last step.
        """
        job = self.jobs.get(job_id)
        held = job.lock.acquire(blocking=wait)
        try:
            if held and not job.closed:
                if not wait and job.inflight is not None:
                    return [job.step] * job.plan.n_shards
                settle(job)
            if job.broken or job.closed == DELETED:
                return [-1] * job.plan.n_shards
            if job.closed == STOPPING:
                return [job.step] * job.plan.n_shards     # saved (or just stopped) where it was: not unusable
            if not held:
                return [job.step] * job.plan.n_shards
            with self._marking(job):
                return job.group.call("get_step")
        finally:
            if held:
                job.lock.release()

    def delete_job(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        with job.lock:
            job.closed = DELETED
            job.inflight = None           # a step in flight ends with the shards
            job.group.close()
        if self.metrics:
            self.metrics.job_deleted(job_id)
        if self.state is not None:
            self.state.delete_job(job_id)
        log.info("deleted %s", job_id, extra={"job_id": job_id})

    def resume(self) -> list[str]:
        """After a restart: every job saved under --state-dir, at its last complete checkpoint."""
        resumed = []
        for job_id, config, step, states in self.state.load() if self.state else []:
            try:
                self.create_job(config, job_id=job_id, resume=(step, states))
                resumed.append(job_id)
                log.info("resumed %s at step %d", job_id, step, extra={"job_id": job_id, "step": step})
            except Exception as exc:       # one job that cannot come back must not stop the others
                log.error("cannot resume %s: %s", job_id, exc, extra={"job_id": job_id})
        return resumed

    def delete_dataset(self, dataset_id: str) -> None:
        """Forget an upload; refused while a job reads it (a recovery or a restart would need it)."""
        self.datasets.get(dataset_id)
        self.jobs.refuse_if_stopping("delete the data set")     # a job that resumes then may need it
        users = [j.job_id for j in self.jobs.all() if j.config.data.dataset_id == dataset_id]
        if users:
            raise FailedPrecondition(f"data set {dataset_id} is used by {', '.join(users)}; delete those jobs first")
        self.datasets.delete(dataset_id)

    def checkpoint(self, job_id: str) -> int:
        """Checkpoint now (durably with --state-dir); returns the step."""
        job = self.jobs.get(job_id)
        with using(job), self._marking(job):
            return take_checkpoint(job, self.state).step

    def save_all(self) -> list[str]:
        """Before a graceful stop: a durable checkpoint of every job (a step in flight settled
        first), so that the next start resumes each at the step it reached, not at its last
        periodic checkpoint. Returns the jobs saved. A job that cannot be saved (a dead shard,
        a full disk, a job already unusable) is logged and keeps its last complete checkpoint.
        Every job is written, changed or not: the one in memory may be ahead of the disk (a
        checkpoint whose write failed), and one more write per job is what a periodic one costs.

        A saved job is closed at once, under its lock: gRPC's stop() does not wait for the
        handler threads it has let go of, and one of them, waiting for the lock, would
        otherwise begin a step after the checkpoint."""
        if self.state is None:
            return []
        self.jobs.stopping = True
        saved = []
        for job in self.jobs.all():
            t0 = time.perf_counter()
            try:
                with using(job):
                    step = take_checkpoint(job, self.state).step
                    job.closed = STOPPING
            except NotFound:
                log.debug("%s was deleted before it could be saved", job.job_id, extra={"job_id": job.job_id})
                continue
            except Exception as exc:
                log.warning("could not save %s before stopping (%s: %s); the next start resumes it at its last "
                            "saved checkpoint", job.job_id, type(exc).__name__, exc, extra={"job_id": job.job_id})
                with job.lock:
                    job.closed = job.closed or STOPPING    # no step after it: the next start would not have it
                continue
            saved.append(job.job_id)
            log.info("saved %s at step %d before stopping (%.2f s)", job.job_id, step, time.perf_counter() - t0,
                     extra={"job_id": job.job_id, "step": step})
        return saved

    def close(self) -> None:
        """Stop every job's shards (server shutdown). Durable state stays for the next start."""
        self.jobs.stopping = True
        for job in self.jobs.take_all():      # a DeleteJob still running took its job first: it stops the shards
            with job.lock:
                job.closed = STOPPING
                job.inflight = None
                job.group.close()
            if self.metrics:
                self.metrics.job_deleted(job.job_id)

    # --- parameters -------------------------------------------------------------------
    def get_params(self, job_id: str) -> np.ndarray:
        return self.param_pieces(job_id, np.concatenate)

    def param_pieces(self, job_id: str, read: Callable[[list[np.ndarray]], T] = private_copies) -> T:
        """read(the shards' slices of the flat parameters, in order), called under the job's lock.

        The slices may be the shards' live memory lent read-only for the call
        (ShardGroup.lend): `read` copies or encodes them and keeps no view. The default
        gives private copies; the servicer encodes its messages straight from the slices.
        """
        job = self.jobs.get(job_id)
        with using(job), self._marking(job):
            return _read_lent(read, job.group.lend("get_params"))

    def set_params(self, job_id: str, named: dict[str, np.ndarray]) -> Job:
        """Replace the tensors given (named, or "flat"); the others keep their values.

        The optimizer state (momentum, Adam moments) is kept, as torch keeps it when a
        parameter's data is overwritten.
        """
        job = self.jobs.get(job_id)
        with using(job), self._marking(job):
            theta = flat_from(job, named, partial=True)
            job.shard_epoch += 1          # new parameters: a prefetched forward is stale
            job.group.call("set_params", each=[{"theta": theta[s.begin:s.end]} for s in job.plan.param_slices()])
            # A recovery restores the last checkpoint and replays the steps since; values set
            # here are not a step, so they start a new checkpoint (durable with --state-dir).
            take_checkpoint(job, self.state)
            return job

    # --- computations -------------------------------------------------------------------
    def gradient(self, job_id: str, rows: np.ndarray | None = None,
                 params: dict[str, np.ndarray] | None = None) -> GradientResult:
        """Loss and the assembled gradient, at the job's parameters or at `params`."""
        job = self.jobs.get(job_id)
        with using(job), self._marking(job):
            rows = check_rows(job, rows)
            theta = flat_from(job, params, partial=False) if params else None
            fwd = forward(job, rows, theta)
            loss, dZ = loss_and_dZ(job.spec.loss, fwd.Z, fwd.y)
            out = job.group.call("backward", fwd.token, job.group.put(dZ), want_grad=True)
            seconds = [a + b for a, (_, _, b) in zip(fwd.shard_seconds, out)]
            return GradientResult(loss + fwd.penalty, [g for _, g, _ in out], math.sqrt(sum(q for q, _, _ in out)),
                                  len(fwd.y), job.step, seconds)

    def held_gradient(self, job_id: str, read: Callable[[list[np.ndarray]], list] = private_copies) -> GradientResult:
        """The gradient the job's last step applied (after clipping), as its shards keep it.

        Nothing is computed: the shards' slices are gathered. Its loss, rows and shard
        seconds are that step's; `step` is the job's step it was computed at, one before
        `applied_step`. A client's ComputeGradient does not replace it. The result's pieces
        are read(the slices), under the job's lock, as in param_pieces.
        """
        job = self.jobs.get(job_id)
        with using(job), self._marking(job):
            report = job.held_gradient
            if report is None:
                raise FailedPrecondition(
                    f"job {job_id} keeps no step's gradient: it has run no step since it was created or resumed, "
                    f"or a shard was restarted and no step replayed since; run Step, or call ComputeGradient")
            pieces = _read_lent(read, job.group.lend("get_grad"))
            return GradientResult(report.loss, pieces, report.grad_norm * report.clip_scale, report.batch_rows,
                                  report.step - 1, report.shard_seconds, report.step, report.clip_scale)

    def step(self, job_id: str, steps: int, learning_rate: float = 0.0,
             expected_step: int | None = None) -> Iterator[StepReport]:
        """Run `steps` synchronized optimizer steps, yielding a report after each.

        With expected_step, the steps run only if the job is at that step when the first
        one starts (else Aborted): a retried request never applies its steps twice.
        """
        job = self.jobs.get(job_id)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        _check_lr(learning_rate)
        with contextlib.closing(self._steps(job, steps, learning_rate, expected_step)) as reports:
            for report, _ in reports:
                yield report

    def train(self, job_id: str, steps: int = 0, epochs: int = 0, eval_every: int = 0,
              learning_rate: float = 0.0, expected_step: int | None = None) -> Iterator[TrainEvent]:
        """Run `steps` steps, or until `epochs` more epochs end; evaluate on the held-out rows.

        Stopping the iteration (a cancelled client) stops at a step boundary: a step is
        applied by every shard or by none.
        """
        job = self.jobs.get(job_id)
        if (steps > 0) == (epochs > 0) or steps < 0 or epochs < 0:
            raise ValueError(f"set exactly one of steps or epochs (> 0), got steps={steps}, epochs={epochs}")
        if eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = only at the end), got {eval_every}")
        _check_lr(learning_rate)
        if steps == 0:
            per_epoch = batches_per_epoch(job.n_train, job.config.batch_size)
            with using(job):              # the job's step once a step in flight is settled
                steps = epochs * per_epoch - job.step % per_epoch
        t0, examples, count = time.perf_counter(), 0, 0
        log.info("training %s for %d steps from step %d", job.job_id, steps, job.step,
                 extra={"job_id": job.job_id, "step": job.step})

        def evaluation_due(report: StepReport) -> Evaluation | None:
            nonlocal count
            count += 1
            if not len(job.holdout_rows) or not (count == steps or (eval_every and report.step % eval_every == 0)):
                return None
            try:
                return self._evaluate(job, job.holdout_rows)
            except ShardUnavailable:      # training goes on: recover, evaluate again
                recover(job)
                return self._evaluate(job, job.holdout_rows)

        with contextlib.closing(self._steps(job, steps, learning_rate, expected_step, evaluation_due)) as reports:
            for report, evaluation in reports:
                examples += report.batch_rows
                if evaluation is not None:
                    log.info("%s step %d: held-out loss %.6g", job.job_id, report.step, evaluation.loss,
                             extra={"job_id": job.job_id, "step": report.step})
                yield TrainEvent(report, steps, examples / (time.perf_counter() - t0), evaluation)

    def _steps(self, job: Job, steps: int, learning_rate: float, expected_step: int | None,
               after: Callable[[StepReport], T] | None = None) -> Iterator[tuple[StepReport, T | None]]:
        """`steps` steps, yielding (report, after(report)) for each, after() run under the job's lock.

        Each step's report is handed to the caller (the client's stream) while the shards run
        the next step: the report of step k is yielded once step k + 1's update call is on its
        way, so the shards do not wait while it is sent (DESIGN.md). The job's lock is let go
        meanwhile, so that a reader slow to take its reports does not block the job: the step
        in flight is left in Job.inflight, and a call that takes the lock first settles it
        (service.jobs.using), keeping the outcome for this call. A caller that stops iterating
        (a cancelled client) settles the step in flight when it closes this generator: the job
        stops at a step boundary, every shard having applied the same steps. A report in hand
        is yielded before any error that follows it (a step that cannot begin, a job deleted or
        made unusable by another call meanwhile).
        """
        inflight: StepInFlight | None = None
        try:
            for i in range(steps + 1):
                report, extra, error = None, None, None
                with job.lock:
                    if inflight is not None:
                        if not job.closed:
                            settle(job)           # this call's step, unless another call settled it
                        if inflight.settled:      # its own outcome first: the step's error, or its report
                            with self._marking(job) if not job.closed else contextlib.nullcontext():
                                report = inflight.outcome()
                        inflight = None
                    try:                          # as using(job); a report in hand is yielded first
                        admit(job)                # settles a step another call left in flight
                        if i == 0:
                            _check_expected(job, expected_step)
                        with self._marking(job):
                            if report is not None and after is not None:
                                extra = after(report)
                            if i < steps:
                                inflight = job.inflight = begin_step(job, learning_rate, self.state,
                                                                     prefetch_next=i < steps - 1)
                    except Exception as exc:
                        if report is None:
                            raise
                        error = exc
                if report is not None:
                    self._observe(job, report)
                    yield report, extra
                if error is not None:
                    raise error
        finally:
            if inflight is not None and not inflight.settled:
                with job.lock:
                    if job.inflight is inflight:
                        settle(job)
                if inflight.settled:
                    with contextlib.suppress(Exception):      # its error stays with the job (job.broken)
                        self._observe(job, inflight.outcome())

    def evaluate(self, job_id: str, rows: np.ndarray | None = None, split: str = "all") -> Evaluation:
        """Loss (and accuracy) at the current parameters on rows, or on a split of the data."""
        job = self.jobs.get(job_id)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        with using(job), self._marking(job):
            rows = check_rows(job, rows)
            if rows is None and split != "all":
                rows = job.holdout_rows if split == "holdout" else job.train_rows
                if rows is not None and len(rows) == 0:
                    raise ValueError("the job holds no rows out (set holdout_fraction when creating it)")
            return self._evaluate(job, rows)

    def check_gradient(self, job_id: str, coords_per_shard: int = 0, indices: np.ndarray | None = None,
                       h: float = 0.0, seed: int = 0, rows: np.ndarray | None = None) -> CheckResult:
        """Central differences against the analytic gradient, each shard on its own coordinates."""
        job = self.jobs.get(job_id)
        local = choose_coordinates(job, coords_per_shard, indices, seed)
        with using(job), self._marking(job):
            return check_gradient(job, local, h or 1e-6, check_rows(job, rows))

    def _observe(self, job: Job, r: StepReport) -> None:
        log.debug("%s step %d: loss %.6g, %.1f ms", job.job_id, r.step, r.loss, r.seconds * 1e3,
                  extra={"job_id": job.job_id, "step": r.step})
        if self.metrics:
            self.metrics.observe_step(job.job_id, r.seconds, r.shard_seconds, r.bytes_to_shards, r.bytes_from_shards)

    @staticmethod
    @contextlib.contextmanager
    def _marking(job: Job) -> Iterator[None]:
        """A shard that died is replaced before the error reaches the client, who may retry."""
        try:
            yield
        except ShardUnavailable as exc:
            if not job.broken and job.checkpoint is not None:
                recover(job)            # raises ShardUnavailable (job unusable) when it cannot
                raise ShardUnavailable(f"{exc}; the shard was restarted at step {job.step}: retry the call") \
                    from None
            job.broken = job.broken or f"a shard died ({exc})"
            log.warning("%s is unusable: %s", job.job_id, job.broken, extra={"job_id": job.job_id, "step": job.step})
            raise

    def _evaluate(self, job: Job, rows: np.ndarray | None) -> Evaluation:
        fwd = forward(job, rows, keep=False)
        loss, _ = loss_and_dZ(job.spec.loss, fwd.Z, fwd.y, need_grad=False)
        return Evaluation(loss + fwd.penalty, accuracy(job.spec.loss, fwd.Z, fwd.y), len(fwd.y), job.step)


def _check_expected(job: Job, expected_step: int | None) -> None:
    if expected_step is not None and expected_step != job.step:
        raise Aborted(f"job {job.job_id} is at step {job.step}, the request expected step {expected_step}; "
                      f"nothing was applied (a retried request whose steps were applied sees this)")


def _check_lr(learning_rate: float) -> None:
    if not (math.isfinite(learning_rate) and learning_rate >= 0):
        raise ValueError(f"learning_rate must be finite and >= 0 (0 = the job's), got {learning_rate}")
