"""Prometheus metrics of the coordinator: step latency, shard compute time, bytes, jobs, failures."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Steps take from ~1 ms (tiny models) to seconds (large batches).
_SECONDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    """One registry per server, so that tests (and several servers in a process) do not share series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram("gradshard_step_seconds",
                                      "Wall seconds of one synchronized step, by job (StepReport.seconds)",
                                      ["job_id"], buckets=_SECONDS, registry=r)
        self.shard_seconds = Histogram("gradshard_shard_compute_seconds",
                                       "Compute seconds of one shard in one step (name a slow shard)",
                                       ["job_id", "shard"], buckets=_SECONDS, registry=r)
        self.steps = Counter("gradshard_steps", "Synchronized steps applied", ["job_id"], registry=r)
        self.bytes = Counter("gradshard_shard_bytes", "Array bytes moved between the coordinator and the shards",
                             ["job_id", "direction"], registry=r)
        self.active_jobs = Gauge("gradshard_active_jobs", "Jobs the coordinator holds", registry=r)
        self.rpc_seconds = Histogram("gradshard_rpc_seconds", "Seconds per RPC, by method", ["method"],
                                     buckets=_SECONDS, registry=r)
        self.failed_calls = Counter("gradshard_failed_calls", "RPCs that ended with an error status",
                                    ["method", "code"], registry=r)
        self._lock = threading.Lock()
        self._shards: dict[str, int] = {}

    def job_created(self, job_id: str, n_shards: int) -> None:
        with self._lock:
            self._shards[job_id] = n_shards
            self.active_jobs.set(len(self._shards))

    def job_deleted(self, job_id: str) -> None:
        """Drop the job's series, so a long-lived server does not accumulate them."""
        with self._lock:
            n_shards = self._shards.pop(job_id, 0)
            self.active_jobs.set(len(self._shards))
        for metric in (self.step_seconds, self.steps):
            _remove(metric, job_id)
        for direction in ("to_shards", "from_shards"):
            _remove(self.bytes, job_id, direction)
        for s in range(n_shards):
            _remove(self.shard_seconds, job_id, str(s))

    def observe_step(self, job_id: str, seconds: float, shard_seconds: list[float], bytes_to: int,
                     bytes_from: int) -> None:
        self.step_seconds.labels(job_id).observe(seconds)
        self.steps.labels(job_id).inc()
        for s, t in enumerate(shard_seconds):
            self.shard_seconds.labels(job_id, str(s)).observe(t)
        self.bytes.labels(job_id, "to_shards").inc(bytes_to)
        self.bytes.labels(job_id, "from_shards").inc(bytes_from)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the port (0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
