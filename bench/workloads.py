"""Benchmarks: the service against an in-process numpy reference of the same math, in one run.

Each workload builds a job through the real gRPC server (over the Ray it runs on) and the
same model in this process with the same data, dtype and batch, and reports the ratio
service / reference of the median step time over at least 10 steps after warm-up.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.client import Client
from workers.data import init_theta, synthetic_inputs
from workers.losses import loss_and_dZ
from workers.models import ModelSpec
from workers.plan import Slice
from workers.shard_math import shard_math


@dataclass
class Row:
    workload: str
    shards: int
    n_params: int
    service_ms: float = 0.0
    service_spread_ms: float = 0.0      # interquartile range
    reference_ms: float = 0.0
    shard_ms: list[float] = field(default_factory=list)
    overhead_ms: float = 0.0            # service step minus the slowest shard's compute
    bytes_per_step: int = 0
    note: str = ""
    samples: int = 0                    # service steps (or fetches) the medians are over
    round_ratios: list[float] = field(default_factory=list)   # W1, W2: service / reference, round by round

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios when the two sides ran in rounds (each round's
        service and reference steps met the same seconds of the machine); else the ratio of
        the medians."""
        if self.round_ratios:
            return statistics.median(self.round_ratios)
        return self.service_ms / self.reference_ms if self.reference_ms else float("nan")


def _median_iqr(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[2] - q[0]


class ReferenceStep:
    """One process, all parameters: forward, loss and dZ, backward, SGD update (numpy, all cores)."""

    def __init__(self, spec: ModelSpec, rows: int, seed: int, y: np.ndarray) -> None:
        self.spec, self.y = spec, y
        self.math = shard_math(spec, Slice(0, spec.n_units), True)
        self.theta = init_theta(spec, Slice(0, spec.n_units), True, seed, np.float32)
        self.X = synthetic_inputs(seed, rows, Slice(0, spec.n_features), np.float32)
        self.grad = np.empty_like(self.theta)

    def run(self, steps: int, warmup: int) -> list[float]:
        """Seconds of each of `steps` steps after `warmup` more."""
        times = []
        for k in range(warmup + steps):
            t0 = time.perf_counter()
            Z, cache = self.math.forward(self.theta, self.X)
            _, dZ = loss_and_dZ(self.spec.loss, Z, self.y)
            self.math.backward(self.theta, self.X, dZ, cache, out=self.grad)
            np.vdot(self.grad, self.grad)
            self.theta -= 0.01 * self.grad
            if k >= warmup:
                times.append(time.perf_counter() - t0)
        return times


# OpenBLAS's threads spin for about 0.1 s after a product (measured here: one core busy for
# 100 ms after the reference's last step), which would take a core from the shards' next steps.
BLAS_SPIN_S = 0.25
# W1 and W2's rounds: service steps and reference steps kept per round, after WARMUP of each.
# 15 rounds: three W2 runs of 45 rounds here gave medians of 1.09-1.12; the medians of their
# non-overlapping stretches of five rounds ranged over 1.02-1.22, those of fifteen over
# 1.06-1.17 (what is left is the machine's drift from one minute to the next).
ROUNDS, STEPS, WARMUP = 15, 10, 3


def step_workload(client: Client, name: str, model: str, features: int, outputs: int, hidden: int, rows: int,
                  shards: int, rounds: int = ROUNDS, steps: int = STEPS, warmup: int = WARMUP, seed: int = 0,
                  reference: bool = True, clock: Callable[[], float] = time.perf_counter) -> Row:
    """The service's step and the reference's, measured in alternated blocks.

    Each of `rounds` rounds runs one Step call of warmup + steps + 1 steps on the service and
    keeps `steps` of them, then runs warmup + steps reference steps and keeps the last `steps`:
    the machine's drift from one second to the next (tens of percent on this VM) falls on both
    sides alike, instead of on whichever ran in a worse minute. A Step call's first step also
    runs its own forward and its last runs none (the others run the next step's forward in
    their update call), so neither is kept. A service step is timed as its client sees it: from
    the report of the step before to its own (what a Step call takes per step, everything
    included); the coordinator's own timing of the step (StepReport.seconds) goes in the note.
    Medians and IQRs are over the kept steps of all rounds; the ratio is the median of the
    rounds' ratios of medians.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1: a kept step is timed from the report before it")
    job = client.create_job(model, features=features, outputs=outputs, hidden=hidden, rows=rows, shards=shards,
                            seed=seed, learning_rate=0.01, batch_size=0)
    try:
        ref = ReferenceStep(ModelSpec(model, features, outputs, hidden), rows, seed, _labels(client, job)) \
            if reference else None
        reports, gaps, ref_times, ratios = [], [], [], []
        for _ in range(rounds):
            stamps, answered = [], []
            for r in client.step(job.job_id, warmup + steps + 1):
                stamps.append(clock())
                answered.append(r)
            kept, kept_gaps = answered[warmup:-1], list(np.diff(stamps)[warmup - 1:-1])   # gap k: report k-1 to k
            reports += kept
            gaps += kept_gaps
            if ref is not None:
                times = ref.run(steps, warmup)
                ref_times += times
                ratios.append(statistics.median(kept_gaps) / statistics.median(times))
                time.sleep(BLAS_SPIN_S)
        row = Row(name, shards, job.n_params, samples=len(reports), round_ratios=ratios)
        row.service_ms, row.service_spread_ms = (v * 1e3 for v in _median_iqr(gaps))
        row.shard_ms = [statistics.median(r.shard_seconds[s] for r in reports) * 1e3 for s in range(shards)]
        row.overhead_ms = statistics.median(g - max(r.shard_seconds) for g, r in zip(gaps, reports)) * 1e3
        row.bytes_per_step = reports[-1].bytes_to_shards + reports[-1].bytes_from_shards
        row.note = f"coordinator step {statistics.median(r.seconds for r in reports) * 1e3:.2f} ms"
        if ref is not None:
            row.reference_ms = statistics.median(ref_times) * 1e3
            row.note += f"; ratio: median of {rounds} rounds' ({_range_and_middle(ratios)})"
        return row
    finally:
        client.delete_job(job.job_id)


def _range_and_middle(values: list[float]) -> str:
    """"lowest–highest", and the middle half's range when there are enough values for one."""
    text = f"{min(values):.2f}–{max(values):.2f}"
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        text += f", middle half {q[0]:.2f}–{q[2]:.2f}"
    return text


COORDINATOR = None   # set by bench.run: the embedded coordinator, whose labels the reference needs


def _labels(client: Client, job) -> np.ndarray:
    """The job's labels are not an API field; they are the coordinator's, so read them in process."""
    return COORDINATOR.jobs.get(job.job_id).y


def client_step_ms(client: Client, steps: int = 200) -> Row:
    """W3: a 1,010-parameter model; the time between StepReports as the client sees them."""
    job = client.create_job("softmax", features=100, outputs=10, rows=64, shards=2, batch_size=0)
    try:
        list(client.step(job.job_id, 20))
        stamps, reports = [], []
        for r in client.step(job.job_id, steps):
            stamps.append(time.perf_counter())
            reports.append(r)
        gaps = np.diff(stamps) * 1e3
        row = Row("W3 tiny model, end to end", 2, job.n_params)
        row.service_ms, row.service_spread_ms = _median_iqr(list(gaps))
        row.overhead_ms = statistics.median(r.seconds - max(r.shard_seconds) for r in reports) * 1e3
        row.shard_ms = [statistics.median(r.shard_seconds[s] for r in reports) * 1e3 for s in range(2)]
        row.bytes_per_step = reports[-1].bytes_to_shards + reports[-1].bytes_from_shards
        row.note = f"coordinator step {statistics.median(r.seconds for r in reports) * 1e3:.2f} ms"
        return row
    finally:
        client.delete_job(job.job_id)


def gradient_fetch(client: Client, target: str, repeats: int = 30) -> list[Row]:
    """W4: assemble and stream 1,000,000 float32 gradients to a Python client over loopback.

    The client is a process of its own (bench.fetch), as a real client would be. The fetch
    is GetGradient after a step: the shards' kept slices gathered and streamed, the whole
    call timed. Beside it, ComputeGradient's whole call with the shards' compute left out
    (it also runs the forward and backward round trips), its stream after the summary, and
    the same call on a 30-parameter job: what a gradient call costs whatever its size.
    The second row is the ceiling: the same client fetching a prepared 4 MB tensor from a
    bare gRPC server in a process of its own (bench.fetch --serve-bare), our encode and
    decode and nothing else.
    """
    job = client.create_job("softmax", features=100_000, outputs=10, rows=32, shards=2, batch_size=0)
    tiny = bare = None
    try:
        list(client.step(job.job_id, 1))        # a step's gradient for GetGradient
        tiny = client.create_job("softmax", features=10, outputs=3, rows=32, shards=2, batch_size=0)
        bare = subprocess.Popen([sys.executable, "-m", "bench.fetch", "--serve-bare"], stdout=subprocess.PIPE,
                                text=True)
        bare_target = f"127.0.0.1:{int(bare.stdout.readline())}"

        out = json.loads(subprocess.run(
            [sys.executable, "-m", "bench.fetch", "--target", target, "--job", job.job_id, "--tiny-job",
             tiny.job_id, "--bare-target", bare_target, "--repeats", str(repeats)],
            check=True, capture_output=True, text=True, timeout=600).stdout)
    finally:
        if bare is not None:
            bare.kill()
            bare.wait()
        for j in (job, tiny):
            if j is not None:
                client.delete_job(j.job_id)
    nbytes = out["nbytes"]
    sizes = {"held": nbytes, "gradient": nbytes, "stream": nbytes, "params": nbytes, "bare": out["bare_nbytes"]}
    rate = {k: n / statistics.median(out[f"{k}_s"]) / 1e9 for k, n in sizes.items()}
    row = Row("W4 gradient fetch (GetGradient), 1M float32", 2, job.n_params)
    row.service_ms, row.service_spread_ms = (v * 1e3 for v in _median_iqr(out["held_s"]))
    row.bytes_per_step = nbytes
    row.note = (f"{rate['held']:.2f} GB/s whole call, {rate['held'] / rate['bare']:.0%} of the bare ceiling's; "
                f"ComputeGradient {rate['gradient']:.2f} GB/s whole call (compute excluded), {rate['stream']:.2f} "
                f"GB/s its stream after the summary, {statistics.median(out['tiny_s']) * 1e3:.2f} ms on 30 "
                f"parameters; GetParameters {rate['params']:.2f} GB/s")
    ceiling = Row("W4 ceiling: bare gRPC, 1M float32", 0, out["bare_nbytes"] // 4)
    ceiling.service_ms, ceiling.service_spread_ms = (v * 1e3 for v in _median_iqr(out["bare_s"]))
    ceiling.bytes_per_step = out["bare_nbytes"]
    ceiling.note = f"{rate['bare']:.2f} GB/s"
    return [row, ceiling]


# W5's steps per size: the issue asks every workload for at least ten steps after warm-up
# (three, before, gave step times too irregular to read on this machine).
W5_STEPS, W5_WARMUP = 10, 3


def bytes_vs_params(client: Client) -> list[Row]:
    """W5: bytes per step at a fixed batch for 10^5, 10^6 and 10^7 parameters."""
    rows = []
    for n in (100_000, 1_000_000, 10_000_000):
        r = step_workload(client, f"W5 logistic {n:,} params", "logistic", n - 1, 1, 0, 16, 2, rounds=1,
                          steps=W5_STEPS, warmup=W5_WARMUP, reference=False)
        rows.append(r)
    return rows


def machine() -> str:
    cpu, virtual = "unknown CPU", False
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        virtual = any(line.startswith("flags") and " hypervisor" in line for line in lines)
    except (OSError, StopIteration):
        pass
    import os

    import grpc
    import ray
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}, numpy "
            f"{np.__version__}, Ray {ray.__version__}, grpcio {grpc.__version__}"
            + (" (a virtual machine)" if virtual else ""))
