"""The `gradshard` command: serve, demo, grad and check."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import Iterator

import numpy as np
from tqdm import tqdm

from service.client import Client
from service.config import Settings, add_flags, from_args

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connect(server: str | None, shards_cpus: int = 0) -> Iterator[Client]:
    """A client of --server, or of a coordinator embedded in this process (local Ray, port 0)."""
    if server:
        with Client(server) as client:
            yield client
        return
    from service.coordinator import Coordinator
    from service.runtime import start_ray
    from service.server import create_server, set_serving

    coordinator = Coordinator()
    grpc_server, port, health = create_server(coordinator, "127.0.0.1:0")
    try:
        print("starting an embedded coordinator on a local Ray ...", file=sys.stderr)
        start_ray(Settings(ray_cpus=shards_cpus))
        set_serving(health)
        with Client(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        grpc_server.stop(0)
        coordinator.close()


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="host:port of a running coordinator (default: embedded)")
    p.add_argument("--model", choices=["linear", "logistic", "softmax", "mlp"], default="mlp")
    p.add_argument("--hidden", type=int, default=64, help="hidden units of the mlp")
    p.add_argument("--activation", choices=["relu", "tanh"], default="relu")
    p.add_argument("--data", help=".npz with X and y, as a path the server can read (default: synthetic)")
    p.add_argument("--rows", type=int, default=512, help="synthetic rows")
    p.add_argument("--features", type=int, default=32, help="synthetic features")
    p.add_argument("--outputs", type=int, default=0, help="synthetic classes/outputs (0: 10 for classifiers)")
    p.add_argument("--params", help=".npz of named tensors to start from (default: random init from --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--l2", type=float, default=0.0)


def _create(client: Client, a: argparse.Namespace, **extra):
    hidden = a.hidden if a.model == "mlp" else 0
    outputs = a.outputs or (10 if a.model in ("softmax", "mlp") else 1)
    if a.data:
        job = client.create_job(a.model, hidden=hidden, activation=a.activation, shards=a.shards, dtype=a.dtype,
                                seed=a.seed, l2=a.l2, npz_path=a.data, outputs=a.outputs, **extra)
    else:
        job = client.create_job(a.model, hidden=hidden, activation=a.activation, shards=a.shards, dtype=a.dtype,
                                seed=a.seed, l2=a.l2, rows=a.rows, features=a.features, outputs=outputs, **extra)
    if a.params:
        with np.load(a.params) as f:
            client.set_params(job.job_id, {k: f[k].astype(a.dtype) for k in f.files})
    print(f"job {job.job_id}: {a.model}, {job.n_params:,} parameters, {len(job.shards)} shards, "
          f"{job.rows} rows", file=sys.stderr)
    return job


def cmd_grad(a: argparse.Namespace) -> int:
    with connect(a.server) as client:
        job = _create(client, a)
        t0 = time.perf_counter()
        summary, grads = client.gradient(job.job_id)
        seconds = time.perf_counter() - t0
        print(f"loss {summary.loss:.6g}  |grad| {summary.grad_norm:.6g}  ({seconds * 1e3:.1f} ms, "
              f"shards {', '.join(f'{s * 1e3:.1f}' for s in summary.shard_seconds)} ms)")
        if a.out:
            np.savez(a.out, loss=np.float64(summary.loss), **grads)
            print(f"wrote loss and {', '.join(grads)} to {a.out}")
        client.delete_job(job.job_id)
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    with connect(a.server) as client:
        job = _create(client, a)
        r = client.check_gradient(job.job_id, coords_per_shard=a.coords, h=a.h, seed=a.seed)
        print(f"loss {r.loss:.6g}, h {r.h:g}, {r.checked} coordinates")
        print(f"{'shard':>5} {'checked':>8} {'max abs err':>12} {'max rel err':>12}  worst")
        for s in r.shards:
            w = s.worst[0] if s.worst else None
            where = f"{w.tensor}{list(w.tensor_index)} a={w.analytic:.6g} n={w.numeric:.6g}" if w else ""
            print(f"{s.shard:>5} {s.checked:>8} {s.max_abs_error:>12.3e} {s.max_rel_error:>12.3e}  {where}")
        client.delete_job(job.job_id)
        ok = r.max_abs_error <= a.tol
        print(f"{'OK' if ok else 'FAILED'}: max abs error {r.max_abs_error:.3e} (tolerance {a.tol:g})")
    return 0 if ok else 1


def cmd_demo(a: argparse.Namespace) -> int:
    """A 1M-parameter MLP on synthetic data, trained through the gRPC client."""
    with connect(a.server) as client:
        t0 = time.perf_counter()
        job = client.create_job("mlp", hidden=a.hidden, features=784, outputs=10, rows=a.rows, shards=a.shards,
                                batch_size=a.batch_size, learning_rate=a.lr, seed=a.seed)
        print(f"job {job.job_id}: mlp 784 -> {a.hidden} -> 10, {job.n_params:,} float32 parameters in "
              f"{len(job.shards)} shards ({', '.join(str(s.param_end - s.param_begin) for s in job.shards)}), "
              f"{job.rows} synthetic rows, created in {time.perf_counter() - t0:.1f} s")
        first = client.evaluate(job.job_id)
        print(f"before: loss {first.loss:.4f}, accuracy {first.accuracy:.3f}")
        times, bar = [], tqdm(client.step(job.job_id, a.steps), total=a.steps, unit="step", file=sys.stdout)
        for r in bar:
            times.append(r.seconds)
            bar.set_postfix(loss=f"{r.loss:.4f}", ms=f"{r.seconds * 1e3:.1f}", epoch=r.epoch)
            if r.step == 1 or r.step % a.every == 0:
                bar.write(f"step {r.step:4d}  loss {r.loss:.4f}  {r.seconds * 1e3:6.1f} ms  moved "
                          f"{r.bytes_to_shards:,} B to and {r.bytes_from_shards:,} B from the shards "
                          f"({r.bytes_to_shards + r.bytes_from_shards:,} B; the parameters are "
                          f"{job.n_params * 4:,} B)")
        last = client.evaluate(job.job_id)
        print(f"after {a.steps} steps: loss {last.loss:.4f} (was {first.loss:.4f}), accuracy {last.accuracy:.3f}; "
              f"median step {np.median(times) * 1e3:.1f} ms")
        check = client.check_gradient(job.job_id, coords_per_shard=200, seed=a.seed)
        print(f"finite-difference check of {check.checked} coordinates: max abs error {check.max_abs_error:.2e}, "
              f"max rel error {check.max_rel_error:.2e}")
        client.delete_job(job.job_id)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from service.server import serve
    serve(from_args(a))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradshard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the coordinator (embedded local Ray unless --ray-address)")
    add_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train a 1M-parameter MLP on synthetic data through the gRPC API")
    p.add_argument("--server", help="host:port of a running coordinator (default: embedded)")
    p.add_argument("--hidden", type=int, default=1264, help="hidden units (1264 gives 1,004,890 parameters)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="print a line every N steps")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("grad", help="compute the loss and the gradient once")
    _job_args(p)
    p.add_argument("--out", help="write loss and named gradients to this .npz")
    p.set_defaults(func=cmd_grad)

    p = sub.add_parser("check", help="check the gradient against central finite differences")
    _job_args(p)
    p.add_argument("--coords", type=int, default=64, help="random coordinates per shard")
    p.add_argument("--h", type=float, default=1e-6)
    p.add_argument("--tol", type=float, default=1e-6, help="fail (exit 1) above this max abs error")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import grpc
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
