"""A bounded load test on loopback: N concurrent clients for S seconds, mixed calls on several jobs.

    python -m bench.load --clients 16 --seconds 20      # embedded coordinator on a local Ray

Reports p50 and p99 latency per call kind and every status seen. Each client runs a
bounded loop (stops at the deadline), on its own channel, against this machine only.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict

import grpc

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "ABORTED"}


def _calls(client, job_ids, rng):
    """The mix: what a client of a training service does, weighted toward the common calls."""
    job = rng.choice(job_ids)
    return rng.choices([
        ("GetJob", lambda: client.get_job(job)),
        ("Step", lambda: list(client.step(job, 1))),
        ("ComputeGradient", lambda: client.gradient(job)),
        ("Evaluate", lambda: client.evaluate(job)),
        ("GetParameters", lambda: client.get_params(job)),
        ("ListJobs", lambda: client.list_jobs()),
        ("GetJob unknown", lambda: client.get_job("job-unknown")),     # a documented NOT_FOUND
    ], weights=[3, 4, 2, 2, 1, 1, 1])[0]


def run_load(address: str, job_ids: list[str], clients: int = 16, seconds: float = 20.0, seed: int = 0,
             max_calls_per_client: int = 100_000) -> dict:
    from service.client import Client

    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with Client(address, timeout=60) as client:
            for _ in range(max_calls_per_client):
                if time.monotonic() >= deadline:
                    return
                name, call = _calls(client, job_ids, rng)
                t0 = time.perf_counter()
                try:
                    call()
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    latencies[name].append(time.perf_counter() - t0)
                    statuses[(name, code)] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    every = [x for v in latencies.values() for x in v]
    return {"clients": clients, "seconds": wall, "calls": len(every), "statuses": dict(statuses),
            "p50_ms": _pct(every, 50), "p99_ms": _pct(every, 99),
            "by_call": {n: (len(v), _pct(v, 50), _pct(v, 99)) for n, v in sorted(latencies.items())},
            "undocumented": {k: v for k, v in statuses.items() if k[1] not in DOCUMENTED}}


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3 if len(values) > 1 else values[0] * 1e3


def report(stats: dict) -> str:
    lines = [f"{stats['clients']} clients, {stats['seconds']:.1f} s, {stats['calls']:,} calls "
             f"({stats['calls'] / stats['seconds']:,.0f}/s): p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms",
             "| call | count | p50 ms | p99 ms |", "|---|---|---|---|"]
    lines += [f"| {n} | {c:,} | {p50:.1f} | {p99:.1f} |" for n, (c, p50, p99) in stats["by_call"].items()]
    lines.append("statuses: " + ", ".join(f"{n} {c}: {k}" for (n, c), k in sorted(stats["statuses"].items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--jobs", type=int, default=4)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from service.client import Client
    from service.config import Settings
    from service.coordinator import Coordinator
    from service.runtime import start_ray
    from service.server import create_server, set_serving
    from workers.memory import keep_freed_memory

    keep_freed_memory()                # as the server's `serve` does (workers/memory.py)
    start_ray(Settings())
    coordinator = Coordinator()
    server, port, health = create_server(coordinator, "127.0.0.1:0", workers=32)
    set_serving(health)
    address = f"127.0.0.1:{port}"
    with Client(address, timeout=120) as client:
        jobs = [client.create_job("softmax", features=200, outputs=10, rows=512, shards=2, batch_size=64, seed=k)
                for k in range(a.jobs)]
    stats = run_load(address, [j.job_id for j in jobs], a.clients, a.seconds)
    print(report(stats))
    server.stop(0)
    return 1 if stats["undocumented"] else 0


if __name__ == "__main__":
    sys.exit(main())
