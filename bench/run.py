"""`make bench` / `gradshard bench`: run the workloads and print (and optionally write) whether
each target of the performance issue was met (bench/targets.py), then the table.

    python -m bench.run                      # embedded coordinator on a local Ray, print the table
    python -m bench.run --runs 3             # three runs in a row: each target's figure in each, their median
    python -m bench.run --runs 3 --write bench/RESULTS.md

On a machine whose speed drifts (a small VM: two runs minutes apart have differed by half in
W4), one run says little; `make bench` runs three.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
import time

def table(rows) -> str:
    head = ("| workload | shards | params | service step ms (IQR) | reference ms | ratio | shard compute ms | "
            "overhead ms | bytes/step | note |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ref = f"{r.reference_ms:.2f}" if r.reference_ms else "–"
        ratio = f"{r.ratio:.2f}" if r.reference_ms else "–"
        shard = ", ".join(f"{t:.2f}" for t in r.shard_ms) or "–"
        lines.append(f"| {r.workload} | {r.shards} | {r.n_params:,} | {r.service_ms:.2f} ({r.service_spread_ms:.2f}) | "
                     f"{ref} | {ratio} | {shard} | {r.overhead_ms:.2f} | {r.bytes_per_step:,} | {r.note} |")
    return "\n".join(lines)


def write_keeping_notes(path: str, head: str) -> None:
    """Write `head` as the file's first section; the file's own sections after it (from its
    first line starting "## ": earlier runs, what was tried) stay as they were. Written to a
    temporary file first, so a failed write leaves the old file whole."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        first = re.search(r"(?m)^## ", text)
        notes = "" if first is None else "\n" + text[first.start():]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(head + notes)
    os.replace(tmp, path)


def run_description(path: str, runs: int = 1) -> str:
    """How the table was made, for the head of the results file."""
    from bench.workloads import ROUNDS, STEPS, W5_STEPS, WARMUP
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:               # no git: an installed copy
        commit = ""
    how = f"--runs {runs} --write {path}" if runs > 1 else f"--write {path}"
    passes = (f", {runs} passes over the workloads one after the other (the verdict first, then each pass)"
              if runs > 1 else "")
    text = (f"Run: `python -m bench.run {how}` on {time.strftime('%Y-%m-%d', time.gmtime())}"
            f"{f' at {commit}' if commit else ''}{passes}"
            f". W1, W2: {ROUNDS} rounds, each of {STEPS} service steps (kept from "
            f"a Step call of {WARMUP + STEPS + 1}: the first {WARMUP} warm up and the last runs no next forward) and "
            f"then {STEPS} reference steps (after {WARMUP} more). A service step (W1-W3) is the time from the report "
            f"of the step before to its own, as the client receives them; the note gives the coordinator's own time "
            f"of the step (StepReport.seconds). Medians over the kept steps of all rounds, IQR in brackets; the ratio "
            f"is the median of the rounds' ratios, so that both sides of each meet the same seconds of the machine. "
            f"W3: 200 steps; W5: {W5_STEPS} steps per size; W4: "
            f"30 fetches of each kind. The reference is the same math in this process (numpy, all cores; for W1 the "
            f"plain two-pass step). W4's client and its ceiling's server each run in a process of their own "
            f"(`bench/fetch.py`).")
    return textwrap.fill(text, 95)


def run_workloads(client, target: str, only: set[str]) -> list:
    """One pass over the selected workloads; each row is printed as it is measured."""
    from bench import workloads as w
    rows = []
    if "W1" in only:
        for shards in (1, 2):
            rows.append(w.step_workload(client, "W1 logistic, batch 256", "logistic", 999_999, 1, 0, 256, shards))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if "W2" in only:
        for shards in (1, 2):
            rows.append(w.step_workload(client, "W2 MLP 784-1250-10, batch 256", "mlp", 784, 10, 1250, 256,
                                        shards))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if "W3" in only:
        rows.append(w.client_step_ms(client))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    if "W4" in only:
        rows.extend(w.gradient_fetch(client, target))
        print("\n".join(table(rows[-2:]).splitlines()[-2:]), flush=True)
    if "W5" in only:
        for r in w.bytes_vs_params(client):
            rows.append(r)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def report(runs: list[list]) -> str:
    """The verdict on the targets, then each run's table."""
    from bench.targets import verdict_table
    if len(runs) == 1:
        return f"{verdict_table(runs)}\n\n{table(runs[0])}"
    tables = "\n\n".join(f"### Run {k + 1} of {len(runs)}\n\n{table(rows)}" for k, rows in enumerate(runs))
    return f"{verdict_table(runs)}\n\n{tables}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradshard bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", help="also write the table and the machine to this Markdown file")
    p.add_argument("--only", default="W1,W2,W3,W4,W5", help="comma-separated workloads")
    p.add_argument("--runs", type=int, default=1, help="passes over the workloads, one after the other")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be at least 1")
    only = {name.strip() for name in a.only.split(",")}
    unknown = only - {"W1", "W2", "W3", "W4", "W5"}
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))} (choose among W1,W2,W3,W4,W5)")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from bench import workloads as w
    from service.client import Client
    from service.coordinator import Coordinator
    from service.runtime import start_ray
    from service.config import Settings
    from service.server import create_server, set_serving
    from workers.memory import keep_freed_memory

    keep_freed_memory()                # as the server's `serve` does (workers/memory.py)
    start_ray(Settings())
    coordinator = w.COORDINATOR = Coordinator()
    server, port, health = create_server(coordinator, "127.0.0.1:0")
    set_serving(health)
    runs = []
    with Client(f"127.0.0.1:{port}", timeout=900) as client:
        for k in range(a.runs):
            if a.runs > 1:
                print(f"run {k + 1} of {a.runs}", flush=True)
            runs.append(run_workloads(client, f"127.0.0.1:{port}", only))
    server.stop(0)
    out = report(runs)
    print()
    print(out)
    if a.write:
        head = f"# Benchmark results\n\nMachine: {w.machine()}\n\n{run_description(a.write, a.runs)}\n\n{out}\n"
        write_keeping_notes(a.write, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
