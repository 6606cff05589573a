"""Optimizer as a client: scipy's L-BFGS-B drives gradshard through the gradient RPC.

Another service often owns the optimizer and needs only f(theta) and its gradient.
Here scipy.optimize.minimize(jac=True) calls ComputeGradient at the parameters it
wants (the flat view), and gradshard's shards compute f and the gradient.

    python examples/lbfgs_client.py                   # embedded coordinator, 1,000,001-parameter logistic model
    python examples/lbfgs_client.py --server HOST:PORT --features 1000000 --rows 256
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy.optimize import minimize

from service.client import Client


def minimize_through_service(client: Client, job_id: str, theta0: np.ndarray, dtype: str = "float64",
                             maxiter: int = 100, callback=None, gtol: float = 1e-5):
    """scipy L-BFGS-B on the job's loss; returns scipy's OptimizeResult (x is the flat view, float64)."""
    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        summary, grads = client.gradient(job_id, params={"flat": theta.astype(dtype)}, flat=True)
        return summary.loss, grads["flat"].astype(np.float64)

    return minimize(fun, theta0.astype(np.float64), jac=True, method="L-BFGS-B", callback=callback,
                    options={"maxiter": maxiter, "gtol": gtol})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="host:port of a coordinator (default: an embedded one)")
    p.add_argument("--features", type=int, default=1_000_000)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--maxiter", type=int, default=30)
    a = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "token")   # before ray is imported, as the CLI does
    from service.cli import connect

    with connect(a.server) as client:
        t0 = time.perf_counter()
        job = client.create_job("logistic", features=a.features, rows=a.rows, shards=a.shards, l2=a.l2,
                                dtype="float32", seed=0)
        print(f"job {job.job_id}: logistic, {job.n_params:,} float32 parameters, {len(job.shards)} shards, "
              f"created in {time.perf_counter() - t0:.1f} s")
        theta0 = client.get_params(job.job_id, flat=True)["flat"]
        calls = []

        def report(intermediate_result):
            calls.append(time.perf_counter())
            print(f"iteration {len(calls):3d}  loss {intermediate_result.fun:.6f}", flush=True)

        t0 = time.perf_counter()
        # Each of the 1M partial derivatives is tiny; stop on the iteration count, not on gtol.
        result = minimize_through_service(client, job.job_id, theta0, "float32", a.maxiter, report, gtol=1e-12)
        seconds = time.perf_counter() - t0
        print(f"{result.message}: loss {result.fun:.6f} after {result.nit} iterations, {result.nfev} gradient "
              f"calls, {seconds / max(result.nfev, 1) * 1e3:.0f} ms per call")
        client.delete_job(job.job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
