"""Protobuf messages <-> the coordinator's Python values (used by the servicer only)."""
from __future__ import annotations

import numpy as np

from gradshard.v1 import gradshard_pb2 as pb
from service.coordinator import Evaluation, TrainEvent
from service.datasets import Dataset
from service.jobs import Job, JobConfig
from service.step import StepReport
from service.tensors import dtype_from_pb, dtype_to_pb
from workers.optimizers import OptimizerConfig
from workers.schedules import Schedule
from workers.shard import DataSpec

MODELS = {pb.LINEAR: "linear", pb.LOGISTIC: "logistic", pb.SOFTMAX: "softmax", pb.MLP: "mlp"}
ACTIVATIONS = {pb.ACTIVATION_UNSPECIFIED: "relu", pb.RELU: "relu", pb.TANH: "tanh"}
OPTIMIZERS = {pb.OPTIMIZER_UNSPECIFIED: "sgd", pb.SGD: "sgd", pb.MOMENTUM: "momentum", pb.ADAM: "adam",
              pb.ADAMW: "adamw"}
SCHEDULES = {pb.SCHEDULE_UNSPECIFIED: "constant", pb.CONSTANT: "constant", pb.STEP: "step", pb.COSINE: "cosine"}
SPLITS = {pb.SPLIT_UNSPECIFIED: "all", pb.ALL: "all", pb.TRAIN: "train", pb.HOLDOUT: "holdout"}
PLACEMENTS = {pb.PLACEMENT_UNSPECIFIED: "SPREAD", pb.PACK: "PACK", pb.SPREAD: "SPREAD",
              pb.STRICT_SPREAD: "STRICT_SPREAD"}


def _enum(table: dict, value: int, field: str, enum) -> str:
    if value not in table:
        names = ", ".join(enum.Name(v) for v in table if v)
        raise ValueError(f"{field} must be one of {names}, got "
                         f"{enum.Name(value) if value in enum.values() else value}")
    return table[value]


def split_from_pb(value: int) -> str:
    return _enum(SPLITS, value, "split", pb.Split)


def optimizer_from_pb(o: pb.Optimizer) -> OptimizerConfig:
    d = OptimizerConfig()
    return OptimizerConfig(
        kind=_enum(OPTIMIZERS, o.kind, "optimizer.kind", pb.OptimizerKind),
        momentum=o.momentum if o.HasField("momentum") else d.momentum, nesterov=o.nesterov,
        beta1=o.beta1 if o.HasField("beta1") else d.beta1, beta2=o.beta2 if o.HasField("beta2") else d.beta2,
        eps=o.eps if o.HasField("eps") else d.eps, weight_decay=o.weight_decay)


def schedule_from_pb(s: pb.Schedule) -> Schedule:
    return Schedule(kind=_enum(SCHEDULES, s.kind, "schedule.kind", pb.ScheduleKind), warmup_steps=s.warmup_steps,
                    step_size=s.step_size, gamma=s.gamma if s.HasField("gamma") else Schedule().gamma,
                    total_steps=s.total_steps, min_lr=s.min_lr)


def config_from_pb(r: pb.CreateJobRequest) -> JobConfig:
    if r.model not in MODELS:
        raise ValueError(f"model must be one of LINEAR, LOGISTIC, SOFTMAX, MLP, got "
                         f"{pb.Model.Name(r.model) if r.model in pb.Model.values() else r.model}")
    activation = _enum(ACTIVATIONS, r.activation, "activation", pb.Activation)
    dtype = "float32" if r.dtype == pb.DTYPE_UNSPECIFIED else str(dtype_from_pb(r.dtype))
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be FLOAT32 or FLOAT64, got {pb.DType.Name(r.dtype)}")
    which = r.data.WhichOneof("source")
    features, outputs = 0, r.data.classes
    if which == "synthetic":
        s = r.data.synthetic
        data, features, outputs = DataSpec("synthetic", rows=s.rows, seed=r.seed), s.features, s.outputs
    elif which == "npz_path":
        data = DataSpec("npz", path=r.data.npz_path)
    elif which == "dataset_id":
        data = DataSpec("dataset", path=r.data.dataset_id)
    else:
        raise ValueError("data is required: set data.synthetic, data.npz_path or data.dataset_id")
    return JobConfig(model=MODELS[r.model], data=data, features=features, outputs=outputs, hidden=r.hidden,
                     activation=activation, shards=r.shards, dtype=dtype, seed=r.seed,
                     learning_rate=r.learning_rate or 0.1, batch_size=r.batch_size, l2=r.l2,
                     cpus_per_shard=r.cpus_per_shard, optimizer=optimizer_from_pb(r.optimizer),
                     schedule=schedule_from_pb(r.schedule), clip_norm=r.clip_norm,
                     holdout_fraction=r.holdout_fraction,
                     placement=_enum(PLACEMENTS, r.placement, "placement", pb.Placement),
                     checkpoint_every=r.checkpoint_every or 50)


def _key(table: dict, value: str) -> int:
    return next(k for k, v in table.items() if v == value and k)


def job_to_pb(job: Job, shard_steps: list[int]) -> pb.Job:
    c, spec = job.config, job.spec
    classes = spec.n_outputs if spec.loss == "softmax_ce" else 0
    if c.data.kind == "synthetic":
        data = pb.DataSource(synthetic=pb.SyntheticData(rows=c.data.rows, features=spec.n_features,
                                                        outputs=spec.n_outputs))
    elif c.data.dataset_id:
        data = pb.DataSource(dataset_id=c.data.dataset_id, classes=classes)
    else:
        data = pb.DataSource(npz_path=c.data.path, classes=classes)
    shards = [pb.ShardInfo(index=s, unit_begin=u.begin, unit_end=u.end, param_begin=p.begin, param_end=p.end,
                           node_id=job.node_ids[s], step=shard_steps[s])
              for s, (u, p) in enumerate(zip(job.plan.units, job.plan.param_slices()))]
    o, sch = c.optimizer, c.schedule
    return pb.Job(
        job_id=job.job_id, model=_key(MODELS, c.model), hidden=spec.n_hidden,
        activation=pb.TANH if spec.activation == "tanh" else pb.RELU, dtype=dtype_to_pb(np.dtype(c.dtype)),
        seed=c.seed, learning_rate=c.learning_rate, batch_size=c.batch_size, l2=c.l2, n_params=spec.n_params,
        rows=job.rows, features=spec.n_features, outputs=spec.n_outputs, step=job.step,
        tensors=[pb.TensorInfo(name=n, shape=s) for n, s in spec.tensor_shapes().items()],
        shards=shards, data=data, cpus_per_shard=c.cpus_per_shard,
        optimizer=pb.Optimizer(kind=_key(OPTIMIZERS, o.kind), momentum=o.momentum, nesterov=o.nesterov,
                               beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay),
        schedule=pb.Schedule(kind=_key(SCHEDULES, sch.kind), warmup_steps=sch.warmup_steps,
                             step_size=sch.step_size, gamma=sch.gamma, total_steps=sch.total_steps,
                             min_lr=sch.min_lr),
        clip_norm=c.clip_norm, holdout_fraction=c.holdout_fraction, holdout_rows=len(job.holdout_rows),
        train_rows=job.n_train, error=job.broken, placement=_key(PLACEMENTS, c.placement),
        checkpoint_every=c.checkpoint_every, checkpoint_step=job.checkpoint.step if job.checkpoint else 0)


def report_to_pb(r: StepReport) -> pb.StepReport:
    return pb.StepReport(step=r.step, loss=r.loss, grad_norm=r.grad_norm, seconds=r.seconds,
                         shard_seconds=r.shard_seconds, bytes_to_shards=r.bytes_to_shards,
                         bytes_from_shards=r.bytes_from_shards, batch_rows=r.batch_rows, epoch=r.epoch,
                         learning_rate=r.learning_rate, clip_scale=r.clip_scale)


def evaluation_to_pb(e: Evaluation) -> pb.EvaluateResponse:
    out = pb.EvaluateResponse(loss=e.loss, rows=e.rows, step=e.step)
    if e.accuracy is not None:
        out.accuracy = e.accuracy
    return out


def train_event_to_pb(e: TrainEvent) -> pb.TrainEvent:
    out = pb.TrainEvent(report=report_to_pb(e.report), total_steps=e.total_steps,
                        examples_per_second=e.examples_per_second)
    if e.evaluation is not None:
        out.eval_loss = e.evaluation.loss
        if e.evaluation.accuracy is not None:
            out.eval_accuracy = e.evaluation.accuracy
    return out


def dataset_to_pb(d: Dataset) -> pb.Dataset:
    return pb.Dataset(dataset_id=d.dataset_id, name=d.name, rows=d.rows, features=d.features, bytes=d.nbytes,
                      label_dtype=d.label_dtype)
