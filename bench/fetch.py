"""W4's two ends in a process of their own, as a real client or server would be.

    python -m bench.fetch --target 127.0.0.1:PORT --job JOB --tiny-job JOB [--repeats 10] \
            --bare-target 127.0.0.1:PORT
        fetch a job's flat gradient (kept and computed) and parameters, a tiny job's gradient and
        the bare server's tensor; print the times as JSON (the job must have run a step)
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


def fetch_times(target: str, job_id: str, tiny_job_id: str, bare_target: str, repeats: int) -> dict:
    """Seconds per fetch: GetGradient (the gradient the job's last step applied, nothing
    computed); ComputeGradient's whole call with the shards' compute left out, its stream after
    the summary, and the same call on a tiny job (the fixed cost of a call); GetParameters."""
    from service.client import Client
    from service.tensors import decode_parts
    out = {"held_s": [], "gradient_s": [], "stream_s": [], "tiny_s": [], "params_s": [], "bare_s": []}
    with Client(target, timeout=300) as client, Client(bare_target) as bare:
        def gradient(job: str) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            summary, chunks = client.gradient_stream(job, flat=True)
            t1 = time.perf_counter()
            grads = decode_parts(chunks)
            t2 = time.perf_counter()
            # the shards' compute is not the fetch: leave the slowest shard's time out
            return t2 - t0 - max(summary.shard_seconds), t2 - t1, grads["flat"].nbytes

        def held() -> float:
            t0 = time.perf_counter()
            client.held_gradient(job_id, flat=True)
            return time.perf_counter() - t0

        def bare_fetch() -> float:
            t0 = time.perf_counter()
            out["bare_nbytes"] = bare.get_params("bare", flat=True)["flat"].nbytes
            return time.perf_counter() - t0

        gradient(job_id), gradient(tiny_job_id), held(), bare_fetch()     # warm-up
        for _ in range(repeats):
            out["held_s"].append(held())
            out["bare_s"].append(bare_fetch())
            total, stream, nbytes = gradient(job_id)
            out["gradient_s"].append(total)
            out["stream_s"].append(stream)
            out["tiny_s"].append(gradient(tiny_job_id)[0])
            t0 = time.perf_counter()
            client.get_params(job_id, flat=True)
            out["params_s"].append(time.perf_counter() - t0)
    return {**out, "nbytes": nbytes}


def serve_bare() -> None:
    import grpc

    from gradshard.v1 import gradshard_pb2_grpc as pb_grpc
    from service.chunkwire import encode_pieces, register
    from workers.memory import keep_freed_memory

    keep_freed_memory()                 # as the server's `serve` does
    flat = np.random.default_rng(0).random(1_000_000).astype(np.float32)

    class Bare(pb_grpc.GradShardServicer):
        def GetParameters(self, request, context):
            yield from encode_pieces("flat", [flat])

    server = grpc.server(futures.ThreadPoolExecutor(4))
    register(pb_grpc.add_GradShardServicer_to_server, Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target")
    p.add_argument("--job")
    p.add_argument("--tiny-job")
    p.add_argument("--bare-target", help="a bench.fetch --serve-bare server, for the ceiling")
    p.add_argument("--repeats", type=int, default=10, help="fetches to time (at least 1)")
    p.add_argument("--serve-bare", action="store_true")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a.serve_bare:
        serve_bare()
    else:
        print(json.dumps(fetch_times(a.target, a.job, a.tiny_job, a.bare_target, a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
