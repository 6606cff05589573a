"""The `gradshard` command: serve, demo, train, grad and check."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Iterator

import numpy as np
from tqdm import tqdm

from service.client import Client
from service.config import Settings, add_flags, from_args

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connect(server: str | None, shards_cpus: int = 0, a: argparse.Namespace | None = None) -> Iterator[Client]:
    """A client of --server, or of a coordinator embedded in this process (local Ray, port 0)."""
    if server:
        tls = {} if a is None else dict(token=a.token, tls_ca=a.tls_ca, client_cert=a.tls_cert,
                                        client_key=a.tls_key)
        with Client(server, **tls) as client:
            yield client
        return
    from service.coordinator import Coordinator
    from service.runtime import start_ray
    from service.server import create_server, set_serving
    from workers.memory import keep_freed_memory

    keep_freed_memory()                # as `serve` does (workers/memory.py)
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


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="host:port of a running coordinator (default: embedded)")
    p.add_argument("--token", default=os.environ.get("GRADSHARD_TOKEN", ""),
                   help="bearer token for --server (env GRADSHARD_TOKEN)")
    p.add_argument("--tls-ca", default="", help="CA certificate (PEM) of a TLS --server")
    p.add_argument("--tls-cert", default="", help="this client's certificate (PEM), if the server asks for one")
    p.add_argument("--tls-key", default="", help="this client's private key (PEM)")


def _job_args(p: argparse.ArgumentParser) -> None:
    _client_args(p)
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
    common = dict(hidden=hidden, activation=a.activation if a.model == "mlp" else "relu", shards=a.shards,
                  dtype=a.dtype, seed=a.seed, l2=a.l2, **extra)
    if a.data:
        job = client.create_job(a.model, npz_path=a.data, outputs=a.outputs, **common)
    else:
        outputs = a.outputs or (10 if a.model in ("softmax", "mlp") else 1)
        job = client.create_job(a.model, rows=a.rows, features=a.features, outputs=outputs, **common)
    if a.params:
        with np.load(a.params) as f:
            client.set_params(job.job_id, {k: f[k].astype(a.dtype) for k in f.files})
    print(f"job {job.job_id}: {a.model}, {job.n_params:,} parameters, {len(job.shards)} shards, "
          f"{job.rows} rows", file=sys.stderr)
    return job


def run_training(client: Client, job, steps: int = 0, epochs: int = 0, eval_every: int = 0,
                 every: int = 0) -> list:
    """Train through the Train RPC with a progress bar (loss, examples/s, ETA); returns the events."""
    events = []
    stream = client.train(job.job_id, steps=steps, epochs=epochs, eval_every=eval_every)
    bar = None
    try:
        for e in stream:
            r = e.report
            if bar is None:
                bar = tqdm(total=e.total_steps, unit="step", file=sys.stdout, dynamic_ncols=True)
            events.append(e)
            post = {"loss": f"{r.loss:.4f}", "ex/s": f"{e.examples_per_second:,.0f}", "epoch": r.epoch}
            if e.HasField("eval_loss"):
                post["eval"] = f"{e.eval_loss:.4f}"
                if e.HasField("eval_accuracy"):
                    post["acc"] = f"{e.eval_accuracy:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if every and (len(events) == 1 or r.step % every == 0):
                bar.write(f"step {r.step:5d}  loss {r.loss:.4f}  lr {r.learning_rate:.3g}  {r.seconds * 1e3:6.1f} ms  "
                          f"moved {r.bytes_to_shards:,} B to / {r.bytes_from_shards:,} B from the shards"
                          + (f"  eval loss {e.eval_loss:.4f}" if e.HasField("eval_loss") else ""))
    except KeyboardInterrupt:
        stream.cancel()           # the server stops at a step boundary
        print("\ninterrupted: training stopped at a step boundary", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    return events


def save_plot(events: list, path: str) -> None:
    """The loss curve (and held-out loss) as a PNG; needs the `plot` extra (matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'gradshard[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e.report.step for e in events], [e.report.loss for e in events], label="training batch loss", lw=1)
    evals = [e for e in events if e.HasField("eval_loss")]
    if evals:
        ax.plot([e.report.step for e in evals], [e.eval_loss for e in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cosine_length(a: argparse.Namespace) -> int:
    """Steps of the cosine after warm-up: --total-steps, or what --steps / --epochs will run."""
    from workers.data import batches_per_epoch

    if a.total_steps:
        return a.total_steps
    if a.steps:
        return max(1, a.steps - a.warmup)
    if a.data:
        if not os.path.exists(a.data):
            raise SystemExit("--schedule cosine with --epochs needs --total-steps when --data is not readable here")
        from workers.npz import describe
        rows = describe(a.data)["X"].shape[0]
    else:
        rows = a.rows
    held = max(1, int(a.holdout * rows)) if a.holdout > 0 else 0
    return max(1, a.epochs * batches_per_epoch(rows - held, a.batch_size) - a.warmup)


def cmd_train(a: argparse.Namespace) -> int:
    from service.client import optimizer, schedule

    if (a.steps > 0) == (a.epochs > 0):
        raise SystemExit("give exactly one of --steps or --epochs")
    opt = optimizer(a.optimizer, weight_decay=a.weight_decay, **({"momentum": a.momentum}
                                                                 if a.optimizer == "momentum" else {}),
                    nesterov=a.nesterov)
    sch = schedule(a.schedule, warmup_steps=a.warmup, step_size=a.step_size if a.schedule == "step" else 0,
                   total_steps=_cosine_length(a) if a.schedule == "cosine" else 0)
    with connect(a.server, a=a) as client:
        job = _create(client, a, learning_rate=a.lr, batch_size=a.batch_size, optimizer=opt, schedule=sch,
                      clip_norm=a.clip_norm, holdout_fraction=a.holdout)
        events = run_training(client, job, steps=a.steps, epochs=a.epochs, eval_every=a.eval_every,
                              every=a.every)
        if events:
            first, last = events[0].report, events[-1].report
            line = f"trained {len(events)} steps: batch loss {first.loss:.4f} -> {last.loss:.4f}"
            if events[-1].HasField("eval_loss"):
                line += f", held-out loss {events[-1].eval_loss:.4f}"
                if events[-1].HasField("eval_accuracy"):
                    line += f", accuracy {events[-1].eval_accuracy:.3f}"
            print(line)
        if a.out:
            params = client.get_params(job.job_id)
            np.savez(a.out, **params)
            print(f"wrote {', '.join(params)} to {a.out}")
        if a.plot and events:
            save_plot(events, a.plot)
            print(f"wrote the loss curve to {a.plot}")
        client.delete_job(job.job_id)
    return 0


def cmd_grad(a: argparse.Namespace) -> int:
    with connect(a.server, a=a) as client:
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
    with connect(a.server, a=a) as client:
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
    from service.client import optimizer

    with connect(a.server, a=a) as client:
        t0 = time.perf_counter()
        job = client.create_job("mlp", hidden=a.hidden, features=784, outputs=10, rows=a.rows, shards=a.shards,
                                batch_size=a.batch_size, learning_rate=a.lr, seed=a.seed,
                                optimizer=optimizer("adam"), holdout_fraction=0.2)
        print(f"job {job.job_id}: mlp 784 -> {a.hidden} -> 10, {job.n_params:,} float32 parameters in "
              f"{len(job.shards)} shards ({', '.join(str(s.param_end - s.param_begin) for s in job.shards)}), "
              f"{job.rows} synthetic rows, created in {time.perf_counter() - t0:.1f} s")
        first = client.evaluate(job.job_id, split="holdout")
        print(f"before: held-out loss {first.loss:.4f}, accuracy {first.accuracy:.3f}")
        events = run_training(client, job, steps=a.steps, eval_every=a.every, every=a.every)
        last = client.evaluate(job.job_id, split="holdout")
        times = [e.report.seconds for e in events]
        moved = events[-1].report.bytes_to_shards + events[-1].report.bytes_from_shards
        print(f"after {len(events)} steps: held-out loss {last.loss:.4f} (was {first.loss:.4f}), accuracy "
              f"{last.accuracy:.3f}; median step {np.median(times) * 1e3:.1f} ms, {moved:,} B moved per step "
              f"for {job.n_params * 4:,} B of parameters")
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
    _client_args(p)
    p.add_argument("--hidden", type=int, default=1264, help="hidden units (1264 gives 1,004,890 parameters)")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="print a line (and evaluate) every N steps")
    p.add_argument("--lr", type=float, default=0.001, help="Adam learning rate")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train with a progress bar; save the parameters and the loss curve")
    _job_args(p)
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], default="adam")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["constant", "step", "cosine"], default="constant")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--step-size", type=int, default=100, help="step schedule: steps between decays")
    p.add_argument("--total-steps", type=int, default=0,
                   help="cosine length after warm-up (default: the steps --steps or --epochs will run, minus --warmup)")
    p.add_argument("--clip-norm", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="0: full batch")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of rows held out for evaluation")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--every", type=int, default=0, help="also print a line every N steps")
    p.add_argument("--out", help="write the trained parameters (named tensors) to this .npz")
    p.add_argument("--plot", help="write the loss curve to this .png (needs matplotlib)")
    p.set_defaults(func=cmd_train)

    sub.add_parser("bench", help="benchmark the service against in-process numpy (see bench/run.py --help)")

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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:          # bench parses its own flags
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        from bench.run import main as bench_main
        return bench_main(argv[1:])
    # Ray reads RAY_AUTH_MODE when it is imported (lazily, below), and a local cluster
    # must agree with it. Ray 2.60 turns token auth on for a local cluster anyway; we
    # say so explicitly, so that the CLI, the tests and deployments agree. An operator
    # sets RAY_AUTH_MODE (and RAY_AUTH_TOKEN) in the environment to join other clusters.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    args = build_parser().parse_args(argv)
    from service.logs import configure
    configure(getattr(args, "log_format", "text"),
              logging.INFO if args.verbose or args.command == "serve" else logging.WARNING)
    import grpc
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:         # bad settings, unreadable certificate files
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
