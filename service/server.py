"""The gRPC server: the GradShard service, health checking and reflection."""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradshard.v1 import gradshard_pb2_grpc as pb_grpc
from service.auth import TokenInterceptor, check_exposure, server_credentials
from service.chunkwire import register
from service.client import SERVICE_NAME
from service.config import Settings
from service.coordinator import Coordinator
from service.datasets import DatasetStore
from service.jobs import Limits
from service.metrics import Metrics
from service.runtime import start_ray
from service.servicer import REQUEST_READERS, GradShardServicer
from service.state import StateStore
from workers.memory import keep_freed_memory

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 << 20


def create_server(coordinator: Coordinator, address: str, workers: int = 16,
                  credentials: grpc.ServerCredentials | None = None, token: str = ""
                  ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started server on `address` ("host:0" picks a port); health says NOT_SERVING.

    With credentials it serves TLS only; with a token every call but health checks must carry it.
    """
    interceptors = [TokenInterceptor(token)] if token else []
    # Messages are at most one 1 MiB chunk plus a little: say so, rather than rely on the
    # library's default (a larger message gets RESOURCE_EXHAUSTED).
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors,
                         options=options)
    # the servicer streams prepared chunk bytes as well as messages, and reads chunks apart (service.chunkwire)
    register(pb_grpc.add_GradShardServicer_to_server, GradShardServicer(coordinator), server, REQUEST_READERS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not listen on {address}")
    server.start()
    return server, port, health_servicer


def set_serving(health_servicer: health.HealthServicer) -> None:
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def serve(settings: Settings, ready: threading.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT: listen first (NOT_SERVING), start Ray, then SERVING."""
    check_exposure(settings.host, bool(settings.tls_cert), settings.insecure)
    credentials = (server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                   if settings.tls_cert else None)
    state = StateStore(settings.state_dir) if settings.state_dir else None
    data_dir = settings.data_dir or (os.path.join(settings.state_dir, "datasets") if settings.state_dir else None)
    datasets = DatasetStore(data_dir, settings.max_data_bytes)
    limits = Limits(max_shards=settings.max_shards, max_job_bytes=settings.max_job_bytes, max_jobs=settings.max_jobs,
                    max_params=settings.max_params)
    metrics = Metrics()
    keep_freed_memory()                      # each call reuses the last one's pages (workers/memory.py)
    coordinator = Coordinator(call_timeout_s=settings.call_timeout_s, datasets=datasets, limits=limits,
                              metrics=metrics, state=state, placement_timeout_s=settings.placement_timeout_s)
    server, port, health_servicer = create_server(coordinator, settings.address, settings.workers, credentials,
                                                  settings.token)
    if settings.metrics_port:
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host,
                 metrics.serve(settings.metrics_port, settings.metrics_host))
    log.info("listening on %s:%d with %s%s (NOT_SERVING until Ray is up)", settings.host, port,
             "TLS" if credentials else "plaintext", " and a bearer token" if settings.token else "")
    start_ray(settings)
    if state is not None:
        coordinator.ready = False            # calls wait (UNAVAILABLE) until the saved jobs are back
        resumed = coordinator.resume()
        log.info("resumed %d jobs from %s", len(resumed), settings.state_dir)
        coordinator.ready = True
    set_serving(health_servicer)
    log.info("serving on %s:%d", settings.host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("shutting down (grace %.1f s)", settings.grace_s)
    health_servicer.enter_graceful_shutdown()
    server.stop(settings.grace_s).wait()
    if state is not None:
        # after the calls; each job saved is closed, so no handler still running begins a step after it
        log.info("saved %d jobs to %s", len(coordinator.save_all()), settings.state_dir)
    coordinator.close()
