"""The server's settings: one frozen dataclass, read from flags and GRADSHARD_* variables."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field


def _f(default, help: str):
    """A settings field whose help text is the comment a reader would otherwise look for."""
    return field(default=default, metadata={"help": help})


MAX_CALL_TIMEOUT_S = 1e6     # 11.6 days: longer than any call, and finite for every wait it reaches


@dataclass(frozen=True)
class Settings:
    host: str = _f("127.0.0.1", "interface to listen on; loopback unless told otherwise")
    port: int = _f(50051, "gRPC port; 0 picks a free one")
    ray_address: str = _f("", "\"\" starts a local Ray in process; \"auto\" or \"ray://host:10001\" joins one")
    ray_cpus: int = _f(0, "CPUs of the embedded local Ray; 0 = all of this machine's")
    object_store_mb: int = _f(0, "object store of the embedded Ray in MiB; 0 = Ray's default")
    call_timeout_s: float = _f(600.0, "longest wait for the shards of one call")
    placement_timeout_s: float = _f(30.0, "longest wait to place a job's shards, and to find and restart a "
                                          "dead one; for a node that vanished, 30 s + 2 x this must exceed the "
                                          "time Ray takes to declare it dead (about 65 s with Ray's defaults)")
    workers: int = _f(64, "server threads (concurrent RPCs)")
    grace_s: float = _f(5.0, "seconds in-flight RPCs get on shutdown")
    state_dir: str = _f("", "keep job definitions and checkpoints here and resume them after a restart; \"\" = off")
    data_dir: str = _f("", "where uploaded data sets are kept; \"\" = a new temporary directory")
    max_data_bytes: int = _f(8 << 30, "total bytes of uploaded data sets (RESOURCE_EXHAUSTED beyond)")
    max_shards: int = _f(64, "shards per job; each is a process (RESOURCE_EXHAUSTED beyond)")
    max_jobs: int = _f(64, "jobs held at once (RESOURCE_EXHAUSTED beyond)")
    max_params: int = _f(100_000_000, "parameters of one job (RESOURCE_EXHAUSTED beyond)")
    metrics_host: str = _f("127.0.0.1", "interface of the metrics endpoint (plain HTTP; it names job ids)")
    metrics_port: int = _f(0, "Prometheus metrics on http://host:metrics_port/metrics; 0 = off")
    log_format: str = _f("text", "\"text\", or \"json\": one JSON object per line with job_id and step")
    tls_cert: str = _f("", "server certificate (PEM) for TLS; with tls_key")
    tls_key: str = _f("", "server private key (PEM) for TLS")
    tls_client_ca: str = _f("", "CA (PEM) whose client certificates are required; \"\" = no client certificates")
    token: str = _f("", "bearer token every call must carry (health checks exempt); \"\" = none")
    insecure: bool = _f(False, "allow plaintext beyond loopback (something else protects the network)")
    max_job_bytes: int = _f(16 << 30, "a job's data + a step's batch + parameters + optimizer state in its shards")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.ray_cpus < 0 or self.object_store_mb < 0:
            raise ValueError("ray_cpus and object_store_mb must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if self.max_shards < 1 or self.max_job_bytes < 1:
            raise ValueError("max_shards and max_job_bytes must be >= 1")
        if self.max_data_bytes < 0:
            raise ValueError(f"max_data_bytes must be >= 0, got {self.max_data_bytes}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        # `not (...)` so that NaN fails too; an infinite wait would overflow the waits' clocks
        if not 0 < self.call_timeout_s <= MAX_CALL_TIMEOUT_S or self.workers < 1 \
                or not 0 <= self.grace_s <= MAX_CALL_TIMEOUT_S:
            raise ValueError(f"call_timeout_s in (0, {MAX_CALL_TIMEOUT_S:g}], workers >= 1 and grace_s in "
                             f"[0, {MAX_CALL_TIMEOUT_S:g}] are required, got {self.call_timeout_s}, {self.workers}, "
                             f"{self.grace_s}")
        if not 0 < self.placement_timeout_s <= MAX_CALL_TIMEOUT_S:
            raise ValueError(f"placement_timeout_s must be in (0, {MAX_CALL_TIMEOUT_S:g}], "
                             f"got {self.placement_timeout_s}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per field; its default comes from GRADSHARD_<FIELD> if set."""
    for f in dataclasses.fields(Settings):
        env = os.environ.get(f"GRADSHARD_{f.name.upper()}")
        help_ = f"{f.metadata.get('help', '')} (env GRADSHARD_{f.name.upper()})"
        if f.type == "bool":
            default = env.lower() in ("1", "true", "yes") if env is not None else f.default
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=default, help=help_)
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        default = kind(env) if env is not None else f.default
        shown = "(set)" if f.name == "token" and default else repr(default)   # never print a secret
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                            help=f"{help_[:-1]}; default {shown})")


def from_args(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
