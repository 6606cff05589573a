"""A job's configuration, validated, and its live record in the coordinator."""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Iterator
from dataclasses import dataclass, field

import numpy as np

from service.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from service.shard_group import ShardGroup
from workers.data import holdout_split, prepare_labels
from workers.models import ModelSpec
from workers.npz import describe, open_array
from workers.optimizers import OptimizerConfig
from workers.plan import ShardPlan
from workers.schedules import Schedule
from workers.shard import DataSpec

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class JobConfig:
    """Everything a client chooses about a job. Defaults are what an unset field means."""

    model: str
    data: DataSpec
    features: int = 0          # synthetic only; an .npz gives its own
    outputs: int = 0           # synthetic: K (0 = 1 for linear); .npz: 0 = from the labels
    hidden: int = 0            # mlp only
    activation: str = "relu"
    shards: int = 1
    dtype: str = "float32"
    seed: int = 0
    learning_rate: float = 0.1
    batch_size: int = 0        # 0 = full batch
    l2: float = 0.0
    cpus_per_shard: float = 0.0
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: Schedule = Schedule()
    clip_norm: float = 0.0     # 0 = no clipping; else clip the global gradient norm to this
    holdout_fraction: float = 0.0   # rows held out of training, for evaluation
    placement: str = "SPREAD"  # Ray placement-group strategy of the shards: PACK, SPREAD, STRICT_SPREAD
    checkpoint_every: int = 50  # steps between checkpoints of the shards' state (recovery replays at most this)


def _check_positive_finite(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


@dataclass(frozen=True)
class Limits:
    """What one job may ask of the cluster (RESOURCE_EXHAUSTED beyond)."""

    max_shards: int = 64                # shards per job (each is a process)
    max_jobs: int = 64                  # jobs a coordinator holds at once
    max_params: int = 100_000_000       # parameters of one job
    max_job_bytes: int = 16 << 30       # data + a step's batch + parameters + optimizer state, over all shards


def job_bytes(spec: ModelSpec, config: JobConfig, rows: int) -> int:
    """Bytes the shards will hold: inputs (the MLP's shards each hold all of X), the batch
    a step gathers from them (unless it reads every row), parameters, gradient and
    optimizer state."""
    itemsize = np.dtype(config.dtype).itemsize
    copies_of_X = config.shards if spec.is_mlp else 1
    gathers = config.holdout_fraction > 0 or 0 < config.batch_size < rows
    batch_rows = min(config.batch_size or rows, rows) if gathers else 0
    states = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}[config.optimizer.kind]
    return itemsize * ((rows + batch_rows) * spec.n_features * copies_of_X + spec.n_params * (2 + states))


def check_limits(spec: ModelSpec, config: JobConfig, rows: int, limits: Limits) -> None:
    if config.shards > spec.n_units:   # a malformed request before a limit
        raise ValueError(f"shards must be between 1 and {spec.n_units} (the number of units), got {config.shards}")
    if spec.n_params > limits.max_params:
        raise ResourceExhausted(f"the model has {spec.n_params:,} parameters; this server allows "
                                f"{limits.max_params:,} per job (server flag --max-params)")
    if config.shards > limits.max_shards:
        raise ResourceExhausted(f"shards={config.shards} is more than this server allows ({limits.max_shards}; "
                                f"server flag --max-shards)")
    need = job_bytes(spec, config, rows)
    if need > limits.max_job_bytes:
        raise ResourceExhausted(f"the job needs about {need:,} bytes in its shards (data, a step's batch, "
                                f"parameters, optimizer state); the limit is {limits.max_job_bytes:,} "
                                f"(server flag --max-job-bytes)")


def resolve(config: JobConfig, limits: Limits = Limits()) -> tuple[ModelSpec, np.ndarray | None]:
    """Check a config and derive the model; returns (spec, labels from the file or None)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    _check_positive_finite("learning_rate", config.learning_rate)
    if config.batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0 = full batch), got {config.batch_size}")
    if not (math.isfinite(config.cpus_per_shard) and (config.cpus_per_shard == 0 or config.cpus_per_shard >= 0.01)):
        raise ValueError(f"cpus_per_shard must be 0 (reserve none) or >= 0.01, got {config.cpus_per_shard}")
    if config.shards < 1:
        raise ValueError(f"shards must be >= 1, got {config.shards}")
    if not (math.isfinite(config.clip_norm) and config.clip_norm >= 0):
        raise ValueError(f"clip_norm must be finite and >= 0 (0 = off), got {config.clip_norm}")
    if config.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {config.checkpoint_every}")
    if not (math.isfinite(config.holdout_fraction) and 0 <= config.holdout_fraction < 1):
        raise ValueError(f"holdout_fraction must be in [0, 1), got {config.holdout_fraction}")
    data = config.data
    if data.kind == "synthetic":
        if data.rows < 1:
            raise ValueError(f"data.synthetic.rows must be >= 1, got {data.rows}")
        if config.features < 1:
            raise ValueError(f"data.synthetic.features must be >= 1, got {config.features}")
        if config.outputs < 0:
            raise ValueError(f"data.synthetic.outputs must be >= 0, got {config.outputs}")
        outputs = config.outputs or (1 if config.model in ("linear", "logistic") else 0)
        spec = ModelSpec(config.model, config.features, outputs, config.hidden, config.activation, config.l2)
        check_limits(spec, config, data.rows, limits)
        return spec, None
    if data.kind != "npz":
        raise ValueError("data must be synthetic or npz_path")
    if not data.path:
        raise ValueError("data.npz_path is empty")
    if not os.path.isfile(data.path):
        raise NotFound(f"data.npz_path: no such file {data.path!r} on the server")
    arrays = describe(data.path)
    for name in ("X", "y"):
        if name not in arrays:
            raise ValueError(f"{data.path} has no array {name!r} (has: {', '.join(arrays) or 'none'})")
    X, y = arrays["X"], arrays["y"]
    if len(X.shape) != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X in {data.path} must be 2-D (rows, features) with rows and features >= 1, "
                         f"got shape {X.shape}")
    if X.dtype.kind not in "fiu":
        raise ValueError(f"X in {data.path} must be numeric, got {X.dtype}")
    if len(y.shape) < 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y in {data.path} must have {X.shape[0]} rows like X, got shape {y.shape}")
    labels = np.array(open_array(data.path, "y"))
    if labels.dtype.kind not in "fiub" or not np.all(np.isfinite(labels)):
        raise ValueError(f"y in {data.path} must hold finite numbers")
    if config.model == "linear":
        outputs = 1 if labels.ndim == 1 else labels.shape[1]
    elif config.model == "logistic":
        outputs = 1
    else:
        if config.outputs < 0:
            raise ValueError(f"data.classes must be >= 0 (0 = the largest label + 1), got {config.outputs}")
        outputs = config.outputs or int(labels.max()) + 1
    spec = ModelSpec(config.model, X.shape[1], outputs, config.hidden, config.activation, config.l2)
    check_limits(spec, config, X.shape[0], limits)
    return spec, prepare_labels(spec, labels, config.dtype)


@dataclass
class Job:
    """A live job: its shards, the labels (the only data the coordinator keeps), its step."""

    job_id: str
    config: JobConfig
    spec: ModelSpec
    plan: ShardPlan
    group: ShardGroup
    y: np.ndarray                 # (rows, K) floats for linear, (rows,) otherwise
    node_ids: list[str]
    step: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    train_rows: np.ndarray | None = None      # None: every row trains
    checkpoint: object = None     # service.recovery.Checkpoint: the latest copy of every shard's state
    lr_log: dict = field(default_factory=dict)   # step -> base learning-rate override, for replay
    closed: str = ""              # DELETED or STOPPING ("": open): calls that still hold the object must not touch
                                  # the shards
    shard_epoch: int = 0          # bumped by every call that may replace what the shards keep from a forward
    prefetched: object = None     # service.step.Prefetch: the next step's forward, computed during this one
    broken: str = ""              # why the shards may disagree (a failed step); "" when they agree
    held_gradient: object = None  # service.step.StepReport of the step whose gradient the shards keep; None: none
    inflight: object = None       # service.recovery.StepInFlight: a step the shards are running, not yet settled
    holdout_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    created_ns: int = 0           # when the registry took it (ListJobs' order; --state-dir keeps it)

    def __post_init__(self) -> None:
        self.train_rows, self.holdout_rows = holdout_split(self.config.seed, self.rows,
                                                           self.config.holdout_fraction)

    @property
    def rows(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_train(self) -> int:
        return self.rows if self.train_rows is None else len(self.train_rows)

    @property
    def schedule(self) -> Schedule:
        return self.config.schedule


def check_room(jobs: int, max_jobs: int) -> None:
    if jobs >= max_jobs:
        raise ResourceExhausted(f"the coordinator holds {jobs} jobs, its limit (server flag --max-jobs); "
                                f"delete one first")


@contextlib.contextmanager
def using(job: Job) -> Iterator[Job]:
    """Hold the job's lock, refusing a deleted or broken job. A step left in flight by a Step
    or Train call (while it sends its client a report) is settled first."""
    with job.lock:
        admit(job)
        yield job


# Why a job was closed (Job.closed): a DeleteJob took it, or the server is stopping and has
# saved it or stopped its shards. A call still waiting for such a job hears which: the job the
# server is stopping for is not gone (with --state-dir it resumes at the next start).
DELETED, STOPPING = "deleted", "stopping"


def admit(job: Job) -> None:
    """What a call on the job does first, under its lock: refuse a closed job (NOT_FOUND when
    deleted, UNAVAILABLE when the server is stopping), settle a step left in flight, refuse a
    job that step (or an earlier one) left unusable."""
    if job.closed == STOPPING:
        raise Unavailable(f"the server is stopping; job {job.job_id} takes no more calls here (a server with "
                          "--state-dir resumes it at its last saved checkpoint when it starts again)")
    if job.closed:
        raise NotFound(f"no job {job.job_id!r} (it was deleted)")
    settle(job)
    if job.broken:
        raise FailedPrecondition(f"job {job.job_id} is unusable: {job.broken}; delete it and create it again")


def settle(job: Job) -> None:
    """Wait for the step in flight, if any, and keep its outcome for the call that began it.
    The caller holds the job's lock."""
    inflight, job.inflight = job.inflight, None
    if inflight is not None:
        inflight.settle()


class JobRegistry:
    """Jobs by id, safe to use from many server threads."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.stopping = False      # the server is stopping: no new job
        self._taken: set[str] = set()   # the jobs take_all() let go of: not "unknown" while the server stops
        self._last_created = 0

    def refuse_if_stopping(self, what: str) -> None:
        """Unavailable while the server stops: `what` (e.g. "create the job") is for once it is back."""
        if self.stopping:
            raise Unavailable(f"the server is stopping; {what} once it is back")

    def add(self, job: Job, max_jobs: int) -> None:
        with self._lock:
            self.refuse_if_stopping("create the job again")
            check_room(len(self._jobs), max_jobs)
            # stamped here, under the lock: the order of ListJobs, even should the clock step back
            job.created_ns = self._last_created = max(time.time_ns(), self._last_created + 1)
            self._jobs[job.job_id] = job

    def count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def get(self, job_id: str) -> Job:
        if not job_id:
            raise ValueError("job_id is empty")
        with self._lock:
            return self._found(job_id, self._jobs.get(job_id))

    def _found(self, job_id: str, job: Job | None) -> Job:
        """The job looked up, or why there is none."""
        if job is not None:
            return job
        if job_id in self._taken:         # close() has let go of it; with --state-dir it comes back
            raise Unavailable(f"the server is stopping; job {job_id} takes no more calls here")
        raise NotFound(f"no job {job_id!r}")

    def pop(self, job_id: str) -> Job:
        """Remove and return a job; NotFound if it is unknown or another thread took it first,
        Unavailable if the stopping server let go of it."""
        if not job_id:
            raise ValueError("job_id is empty")
        with self._lock:
            return self._found(job_id, self._jobs.pop(job_id, None))

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def take_all(self) -> list[Job]:
        """Every job, removed in one hold of the lock (server shutdown): a DeleteJob running
        meanwhile has either taken its job first or finds none."""
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            self._taken.update(job.job_id for job in jobs)
        return jobs
