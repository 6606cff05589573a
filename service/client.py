"""A Python client for the gradshard service: numpy arrays in and out of every RPC."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradshard.v1 import gradshard_pb2 as pb
from gradshard.v1 import gradshard_pb2_grpc as pb_grpc
from service.auth import BearerToken
from service.chunkwire import (GRADIENT_REQUEST_PARAMETERS, SET_PARAMETERS_CHUNK, UPLOAD_DATASET_CHUNK,
                               encode_tensors, passthrough, read_chunk, read_gradient_response)
from service.tensors import decode_parts

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradShard"].full_name

MODEL_NAMES = {"linear": pb.LINEAR, "logistic": pb.LOGISTIC, "softmax": pb.SOFTMAX, "mlp": pb.MLP}
DTYPE_NAMES = {"float32": pb.FLOAT32, "float64": pb.FLOAT64}
OPTIMIZER_NAMES = {"sgd": pb.SGD, "momentum": pb.MOMENTUM, "adam": pb.ADAM, "adamw": pb.ADAMW}
SCHEDULE_NAMES = {"constant": pb.CONSTANT, "step": pb.STEP, "cosine": pb.COSINE}
SPLIT_NAMES = {"all": pb.ALL, "train": pb.TRAIN, "holdout": pb.HOLDOUT}


def optimizer(kind: str = "sgd", **fields) -> pb.Optimizer:
    """An Optimizer message: optimizer("adam", beta2=0.99, weight_decay=1e-4)."""
    return pb.Optimizer(kind=OPTIMIZER_NAMES[kind], **fields)


def schedule(kind: str = "constant", **fields) -> pb.Schedule:
    """A Schedule message: schedule("cosine", total_steps=1000, warmup_steps=50)."""
    return pb.Schedule(kind=SCHEDULE_NAMES[kind], **fields)


def _read_all(call, read: Callable[[bytes], object]) -> Iterator:
    """Each raw message of a streaming call, read; the call is cancelled if reading fails or
    the caller stops early (a server's malformed message must not leave the call open)."""
    try:
        for raw in call:
            yield read(raw)
    except BaseException:
        call.cancel()
        raise


def _chunks_only(responses: Iterator) -> Iterator:
    try:
        for r in responses:
            if isinstance(r, pb.GradientSummary):
                raise ValueError("the server's gradient stream holds a message that is not a chunk after its summary")
            yield r
    finally:
        responses.close()            # cancels the call unless it ended


def _summary_then_chunks(call) -> tuple[pb.GradientSummary, Iterator[tuple[pb.TensorChunk, memoryview]]]:
    """A GradientResponse stream's summary, and an iterator over its chunks (closing it cancels the call)."""
    responses = _read_all(call, read_gradient_response)
    summary = next(responses)
    if not isinstance(summary, pb.GradientSummary):
        responses.close()
        raise ValueError("the server's gradient stream did not start with its summary")
    return summary, _chunks_only(responses)


def _batch(rows) -> pb.Batch:
    return pb.Batch(rows=[] if rows is None else np.asarray(rows, np.int64).tolist())


class Client:
    """One channel to one coordinator. Metadata comes back as the protobuf messages."""

    def __init__(self, address: str, timeout: float | None = None, token: str = "", tls_ca: str = "",
                 client_cert: str = "", client_key: str = "") -> None:
        """tls_ca: PEM of the CA that signed the server's certificate (turns TLS on); client_cert and
        client_key: this client's certificate, for servers that require one; token: the bearer token."""
        if tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None)
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        channel = grpc.intercept_channel(self.channel, BearerToken(token)) if token else self.channel
        self.stub = pb_grpc.GradShardStub(channel)
        self.timeout = timeout
        # The two calls that stream tensors out take the raw messages and read each chunk's data
        # as a view of them (service.chunkwire): the protobuf classes would copy it twice more.
        # The calls that send tensors send prepared chunk messages (or messages) the same way.
        self._get_parameters = channel.unary_stream(
            f"/{SERVICE_NAME}/GetParameters", request_serializer=pb.GetParametersRequest.SerializeToString)
        self._compute_gradient = channel.stream_stream(
            f"/{SERVICE_NAME}/ComputeGradient", request_serializer=passthrough(pb.GradientRequest.SerializeToString))
        self._get_gradient = channel.unary_stream(
            f"/{SERVICE_NAME}/GetGradient", request_serializer=pb.GetGradientRequest.SerializeToString)
        self._set_parameters = channel.stream_unary(
            f"/{SERVICE_NAME}/SetParameters", request_serializer=passthrough(pb.SetParametersRequest.SerializeToString),
            response_deserializer=pb.Job.FromString)
        self._upload_dataset = channel.stream_unary(
            f"/{SERVICE_NAME}/UploadDataset", request_serializer=passthrough(pb.UploadDatasetRequest.SerializeToString),
            response_deserializer=pb.Dataset.FromString)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until the health service says SERVING."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout} s")
            time.sleep(0.1)

    # --- jobs ---------------------------------------------------------------------
    def create_job(self, model: str, *, shards: int = 1, dtype: str = "float32", seed: int = 0,
                   learning_rate: float = 0.1, batch_size: int = 0, l2: float = 0.0, hidden: int = 0,
                   activation: str = "relu", rows: int = 0, features: int = 0, outputs: int = 0,
                   npz_path: str | None = None, dataset_id: str | None = None, cpus_per_shard: float = 0.0,
                   optimizer: pb.Optimizer | None = None, schedule: pb.Schedule | None = None,
                   clip_norm: float = 0.0, holdout_fraction: float = 0.0, placement: str = "SPREAD",
                   checkpoint_every: int = 0) -> pb.Job:
        """Create a job on synthetic data (rows, features, outputs), a server-side .npz file or an upload.

        With npz_path or dataset_id, `outputs` is the number of classes (0: the largest label + 1).
        """
        if npz_path is not None:
            data = pb.DataSource(npz_path=npz_path, classes=outputs)
        elif dataset_id is not None:
            data = pb.DataSource(dataset_id=dataset_id, classes=outputs)
        else:
            data = pb.DataSource(synthetic=pb.SyntheticData(rows=rows, features=features, outputs=outputs))
        request = pb.CreateJobRequest(
            model=MODEL_NAMES[model], hidden=hidden, activation=pb.TANH if activation == "tanh" else pb.RELU,
            shards=shards, dtype=DTYPE_NAMES[dtype], seed=seed, learning_rate=learning_rate,
            batch_size=batch_size, l2=l2, data=data, cpus_per_shard=cpus_per_shard, optimizer=optimizer,
            schedule=schedule, clip_norm=clip_norm, holdout_fraction=holdout_fraction,
            placement=pb.Placement.Value(placement), checkpoint_every=checkpoint_every)
        return self.stub.CreateJob(request, timeout=self.timeout)

    def get_job(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def list_jobs(self) -> list[pb.Job]:
        return list(self.stub.ListJobs(pb.ListJobsRequest(), timeout=self.timeout).jobs)

    def delete_job(self, job_id: str) -> None:
        self.stub.DeleteJob(pb.DeleteJobRequest(job_id=job_id), timeout=self.timeout)

    # --- parameters and gradients -------------------------------------------------
    def get_params(self, job_id: str, flat: bool = False) -> dict[str, np.ndarray]:
        call = self._get_parameters(pb.GetParametersRequest(job_id=job_id, flat=flat), timeout=self.timeout)
        with contextlib.closing(_read_all(call, read_chunk)) as chunks:    # cancels the call if decoding fails
            return decode_parts(chunks)

    def set_params(self, job_id: str, tensors: dict[str, np.ndarray]) -> pb.Job:
        def requests():
            yield pb.SetParametersRequest(job_id=job_id)
            yield from encode_tensors(tensors, field=SET_PARAMETERS_CHUNK)
        return self._set_parameters(requests(), timeout=self.timeout)

    def gradient(self, job_id: str, rows=None, params: dict[str, np.ndarray] | None = None,
                 flat: bool = False) -> tuple[pb.GradientSummary, dict[str, np.ndarray]]:
        """(summary with the loss, gradient tensors) at the job's parameters or at `params`."""
        summary, chunks = self.gradient_stream(job_id, rows, params, flat)
        with contextlib.closing(chunks):                                    # cancels the call if decoding fails
            return summary, decode_parts(chunks)

    def gradient_stream(self, job_id: str, rows=None, params: dict[str, np.ndarray] | None = None,
                        flat: bool = False) -> tuple[pb.GradientSummary, Iterator[tuple[pb.TensorChunk, memoryview]]]:
        """gradient() as it arrives: the summary, then each chunk as (its fields but data, its data).

        The call stays open until the chunks are read to the end (or the iterator is closed,
        which cancels it); a chunk's data is a view of the message received.
        """
        def requests():
            yield pb.GradientRequest(job_id=job_id, batch=_batch(rows), flat=flat)
            yield from encode_tensors(params or {}, field=GRADIENT_REQUEST_PARAMETERS)
        return _summary_then_chunks(self._compute_gradient(requests(), timeout=self.timeout))

    def held_gradient(self, job_id: str, flat: bool = False) -> tuple[pb.GradientSummary, dict[str, np.ndarray]]:
        """(summary, gradient tensors) that the job's last step applied (GetGradient): nothing is
        computed. summary.applied_step names the step; grad_norm is after its clipping."""
        summary, chunks = self.held_gradient_stream(job_id, flat)
        with contextlib.closing(chunks):                                    # cancels the call if decoding fails
            return summary, decode_parts(chunks)

    def held_gradient_stream(self, job_id: str, flat: bool = False
                             ) -> tuple[pb.GradientSummary, Iterator[tuple[pb.TensorChunk, memoryview]]]:
        """held_gradient() as it arrives, as gradient_stream() gives a computed one."""
        return _summary_then_chunks(self._get_gradient(pb.GetGradientRequest(job_id=job_id, flat=flat),
                                                       timeout=self.timeout))

    # --- training and checks ------------------------------------------------------
    def step(self, job_id: str, steps: int = 1, learning_rate: float = 0.0,
             expected_step: int | None = None) -> Iterator[pb.StepReport]:
        """Run synchronized optimizer steps; one report per step. expected_step makes a retry safe."""
        return self.stub.Step(pb.StepRequest(job_id=job_id, steps=steps, learning_rate=learning_rate,
                                             expected_step=expected_step), timeout=self.timeout)

    def train(self, job_id: str, steps: int = 0, epochs: int = 0, eval_every: int = 0,
              learning_rate: float = 0.0, expected_step: int | None = None) -> Iterator[pb.TrainEvent]:
        """Train for steps or epochs; one event per step. Call .cancel() on it to stop at a step boundary."""
        return self.stub.Train(pb.TrainRequest(job_id=job_id, steps=steps, epochs=epochs, eval_every=eval_every,
                                               learning_rate=learning_rate, expected_step=expected_step),
                               timeout=self.timeout)

    def evaluate(self, job_id: str, rows=None, split: str = "all") -> pb.EvaluateResponse:
        return self.stub.Evaluate(pb.EvaluateRequest(job_id=job_id, batch=_batch(rows), split=SPLIT_NAMES[split]),
                                  timeout=self.timeout)

    def checkpoint(self, job_id: str) -> pb.CheckpointResponse:
        return self.stub.Checkpoint(pb.CheckpointRequest(job_id=job_id), timeout=self.timeout)

    # --- data sets ----------------------------------------------------------------
    def upload_dataset(self, X: np.ndarray, y: np.ndarray, name: str = "", classes: int = 0) -> pb.Dataset:
        """Stream X (rows, features) and y (rows,) to the server in chunks of at most 1 MiB."""
        def requests():
            yield pb.UploadDatasetRequest(name=name, classes=classes)
            yield from encode_tensors({"X": X, "y": y}, field=UPLOAD_DATASET_CHUNK)
        return self._upload_dataset(requests(), timeout=self.timeout)

    def list_datasets(self) -> list[pb.Dataset]:
        return list(self.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=self.timeout).datasets)

    def delete_dataset(self, dataset_id: str) -> None:
        self.stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=dataset_id), timeout=self.timeout)

    def check_gradient(self, job_id: str, coords_per_shard: int = 0, indices=None, h: float = 0.0,
                       seed: int = 0, rows=None, worst: int = 0) -> pb.CheckGradientResponse:
        request = pb.CheckGradientRequest(
            job_id=job_id, coords_per_shard=coords_per_shard,
            indices=[] if indices is None else np.asarray(indices, np.int64).tolist(),
            h=h, seed=seed, batch=_batch(rows), worst=worst)
        return self.stub.CheckGradient(request, timeout=self.timeout)
