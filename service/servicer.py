"""The gRPC servicer: decode the request, call the coordinator, encode the answer.

This module and service.client are the only ones that touch the generated protos.
Every exception is mapped to one status code here (_STATUS), so a client never
sees UNKNOWN for its own mistake.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator

import grpc
import numpy as np

from gradshard.v1 import gradshard_pb2 as pb
from gradshard.v1 import gradshard_pb2_grpc as pb_grpc
from service import errors
from service.coordinator import Coordinator
from service.jobs import Job, JobConfig
from service.tensors import TensorAssembler, dtype_from_pb, dtype_to_pb, encode, encode_all
from workers.shard import DataSpec

log = logging.getLogger(__name__)

MODELS = {pb.LINEAR: "linear", pb.LOGISTIC: "logistic", pb.SOFTMAX: "softmax", pb.MLP: "mlp"}
ACTIVATIONS = {pb.ACTIVATION_UNSPECIFIED: "relu", pb.RELU: "relu", pb.TANH: "tanh"}
_STATUS = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ShardUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ShardTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def _status_of(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    code = _status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else f"internal error: {exc!r}")


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)
    return wrapper


def _streaming(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)
    return wrapper


def _rows(batch: pb.Batch) -> np.ndarray | None:
    return np.fromiter(batch.rows, np.int64, len(batch.rows)) if len(batch.rows) else None


def config_from_pb(r: pb.CreateJobRequest) -> JobConfig:
    if r.model not in MODELS:
        raise ValueError(f"model must be one of LINEAR, LOGISTIC, SOFTMAX, MLP, got "
                         f"{pb.Model.Name(r.model) if r.model in pb.Model.values() else r.model}")
    if r.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be RELU or TANH, got {r.activation}")
    dtype = "float32" if r.dtype == pb.DTYPE_UNSPECIFIED else str(dtype_from_pb(r.dtype))
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be FLOAT32 or FLOAT64, got {pb.DType.Name(r.dtype)}")
    which = r.data.WhichOneof("source")
    if which == "synthetic":
        s = r.data.synthetic
        data, features, outputs = DataSpec("synthetic", rows=s.rows, seed=r.seed), s.features, s.outputs
    elif which == "npz_path":
        data, features, outputs = DataSpec("npz", path=r.data.npz_path), 0, r.data.classes
    else:
        raise ValueError("data is required: set data.synthetic or data.npz_path")
    return JobConfig(model=MODELS[r.model], data=data, features=features, outputs=outputs, hidden=r.hidden,
                     activation=ACTIVATIONS[r.activation], shards=r.shards, dtype=dtype, seed=r.seed,
                     learning_rate=r.learning_rate or 0.1, batch_size=r.batch_size, l2=r.l2,
                     cpus_per_shard=r.cpus_per_shard)


def job_to_pb(job: Job) -> pb.Job:
    c, spec = job.config, job.spec
    model = {v: k for k, v in MODELS.items()}[c.model]
    if c.data.kind == "synthetic":
        data = pb.DataSource(synthetic=pb.SyntheticData(rows=c.data.rows, features=spec.n_features,
                                                        outputs=spec.n_outputs))
    else:
        data = pb.DataSource(npz_path=c.data.path, classes=spec.n_outputs if spec.loss == "softmax_ce" else 0)
    shards = [pb.ShardInfo(index=s, unit_begin=u.begin, unit_end=u.end, param_begin=p.begin, param_end=p.end,
                           node_id=job.node_ids[s])
              for s, (u, p) in enumerate(zip(job.plan.units, job.plan.param_slices()))]
    return pb.Job(job_id=job.job_id, model=model, hidden=spec.n_hidden,
                  activation=pb.TANH if spec.activation == "tanh" else pb.RELU,
                  dtype=dtype_to_pb(np.dtype(c.dtype)), seed=c.seed, learning_rate=c.learning_rate,
                  batch_size=c.batch_size, l2=c.l2, n_params=spec.n_params, rows=job.rows,
                  features=spec.n_features, outputs=spec.n_outputs, step=job.step,
                  tensors=[pb.TensorInfo(name=n, shape=s) for n, s in spec.tensor_shapes().items()],
                  shards=shards, data=data, cpus_per_shard=c.cpus_per_shard)


class GradShardServicer(pb_grpc.GradShardServicer):
    """Translates between protobuf and the numpy coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    @_unary
    def CreateJob(self, request, context):
        return job_to_pb(self.coordinator.create_job(config_from_pb(request)))

    @_unary
    def GetJob(self, request, context):
        return job_to_pb(self.coordinator.jobs.get(request.job_id))

    @_unary
    def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in self.coordinator.jobs.all()])

    @_unary
    def DeleteJob(self, request, context):
        self.coordinator.delete_job(request.job_id)
        return pb.DeleteJobResponse()

    @_streaming
    def GetParameters(self, request, context):
        job = self.coordinator.jobs.get(request.job_id)
        flat = self.coordinator.get_params(request.job_id)
        yield from encode("flat", flat) if request.flat else encode_all(job.spec.to_named(flat))

    @_unary
    def SetParameters(self, request_iterator, context):
        job_id, tensors = self._read_tensors(request_iterator, lambda r: r.chunk, lambda r: r.HasField("chunk"))
        return job_to_pb(self.coordinator.set_params(job_id, tensors))

    @_streaming
    def ComputeGradient(self, request_iterator, context):
        first: list[pb.GradientRequest] = []

        def remember(r):
            if not first:
                first.append(r)
            return r.parameters

        job_id, params = self._read_tensors(request_iterator, remember, lambda r: r.HasField("parameters"))
        head = first[0]
        job = self.coordinator.jobs.get(job_id)
        result = self.coordinator.gradient(job_id, _rows(head.batch), params or None)
        yield pb.GradientResponse(summary=pb.GradientSummary(
            loss=result.loss, grad_norm=result.grad_norm, rows=result.rows, step=result.step,
            shard_seconds=result.shard_seconds))
        chunks = encode("flat", result.grad) if head.flat else encode_all(job.spec.to_named(result.grad))
        for chunk in chunks:
            yield pb.GradientResponse(chunk=chunk)

    @_streaming
    def Step(self, request, context):
        for r in self.coordinator.step(request.job_id, request.steps, request.learning_rate):
            yield pb.StepReport(step=r.step, loss=r.loss, grad_norm=r.grad_norm, seconds=r.seconds,
                                shard_seconds=r.shard_seconds, bytes_to_shards=r.bytes_to_shards,
                                bytes_from_shards=r.bytes_from_shards, batch_rows=r.batch_rows,
                                epoch=r.epoch, learning_rate=r.learning_rate)

    @_unary
    def Evaluate(self, request, context):
        loss, acc, rows, step = self.coordinator.evaluate(request.job_id, _rows(request.batch))
        out = pb.EvaluateResponse(loss=loss, rows=rows, step=step)
        if acc is not None:
            out.accuracy = acc
        return out

    @_unary
    def CheckGradient(self, request, context):
        r = request
        job = self.coordinator.jobs.get(r.job_id)
        indices = np.fromiter(r.indices, np.int64, len(r.indices)) if len(r.indices) else None
        result = self.coordinator.check_gradient(r.job_id, r.coords_per_shard, indices, r.h, r.seed,
                                                 _rows(r.batch))
        n_worst = r.worst or 5
        if n_worst < 0:
            raise ValueError(f"worst must be >= 0, got {n_worst}")
        out = pb.CheckGradientResponse(loss=result.loss, h=result.h)
        for s in result.shards:
            abs_e, rel_e = s.abs_error, s.rel_error
            worst = []
            for k in np.argsort(-abs_e, kind="stable")[:n_worst]:
                name, where = job.spec.locate(int(s.indices[k]))
                worst.append(pb.CheckedCoordinate(
                    index=int(s.indices[k]), tensor=name, tensor_index=where, analytic=float(s.analytic[k]),
                    numeric=float(s.numeric[k]), abs_error=float(abs_e[k]), rel_error=float(rel_e[k])))
            out.shards.append(pb.ShardCheck(
                shard=s.shard, checked=len(s.indices), max_abs_error=float(abs_e.max(initial=0.0)),
                max_rel_error=float(rel_e.max(initial=0.0)), worst=worst, seconds=s.seconds))
        out.max_abs_error = max((s.max_abs_error for s in out.shards), default=0.0)
        out.max_rel_error = max((s.max_rel_error for s in out.shards), default=0.0)
        out.checked = sum(s.checked for s in out.shards)
        return out

    def _read_tensors(self, requests: Iterator, chunk_of: Callable, has_chunk: Callable
                      ) -> tuple[str, dict[str, np.ndarray]]:
        """Read a client stream whose first message names the job and whose messages carry chunks."""
        job_id, assembler = "", None
        for r in requests:
            chunk = chunk_of(r)
            if not job_id:
                job_id = r.job_id
                job = self.coordinator.jobs.get(job_id)
                shapes = {**job.spec.tensor_shapes(), "flat": (job.spec.n_params,)}
                assembler = TensorAssembler(shapes, np.dtype(job.config.dtype))
            elif r.job_id and r.job_id != job_id:
                raise ValueError(f"job_id {r.job_id!r} differs from the first message's {job_id!r}")
            if has_chunk(r):
                assembler.add(chunk)
        if assembler is None:
            raise ValueError("the request stream is empty; the first message must name job_id")
        return job_id, assembler.finish()
