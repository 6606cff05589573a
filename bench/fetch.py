"""W4's two ends in a process of their own, as a real client or server would be.

    python -m bench.fetch --target 127.0.0.1:PORT --job JOB [--repeats 10]
        fetch a job's flat gradient and parameters; print their times as JSON
    python -m bench.fetch --serve-bare
        a bare gRPC server that streams a prepared 1M float32 tensor (W4's ceiling); prints its port

Sharing one process (and its GIL) with the server would slow both ends of the stream.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent import futures

import numpy as np


def fetch_times(target: str, job_id: str, repeats: int) -> dict:
    from service.client import Client
    gradient, params = [], []
    with Client(target, timeout=300) as client:
        client.gradient(job_id, flat=True)                 # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            summary, grads = client.gradient(job_id, flat=True)
            # the shards' compute is not the fetch: leave the slowest shard's time out
            gradient.append(time.perf_counter() - t0 - max(summary.shard_seconds))
            t0 = time.perf_counter()
            client.get_params(job_id, flat=True)
            params.append(time.perf_counter() - t0)
    return {"gradient_s": gradient, "params_s": params, "nbytes": int(grads["flat"].nbytes)}


def serve_bare() -> None:
    import grpc

    from gradshard.v1 import gradshard_pb2_grpc as pb_grpc
    from service.tensors import encode

    flat = np.random.default_rng(0).random(1_000_000).astype(np.float32)

    class Bare(pb_grpc.GradShardServicer):
        def GetParameters(self, request, context):
            yield from encode("flat", flat)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_GradShardServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target")
    p.add_argument("--job")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--serve-bare", action="store_true")
    a = p.parse_args(argv)
    if a.serve_bare:
        serve_bare()
    else:
        print(json.dumps(fetch_times(a.target, a.job, a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
