"""The performance issue's targets, judged on a benchmark run's rows (bench.workloads.Row).

`gradshard bench` prints this verdict after its table; with `--runs N` it judges every run
and says in how many of them each target was met. Ratios are judged and shown to three
decimals: a median of 1.104 is printed 1.10 in the table, and misses a target of 1.10.
No numpy, no Ray, no gRPC: a row is read by its workload's name and its shard count.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

from bench.workloads import Row


@dataclass(frozen=True)
class Verdict:
    value: float | None     # what is compared (None: no single number, as for W5)
    text: str               # how it is shown
    met: bool


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    judge: Callable[[Sequence[Row]], Verdict | None]     # None: the run did not include the workload


def _find(rows: Sequence[Row], prefix: str, shards: int | None = None) -> Row | None:
    return next((r for r in rows if r.workload.startswith(prefix) and shards in (None, r.shards)), None)


def _ratio(prefix: str) -> Callable[[Sequence[Row]], Verdict | None]:
    def judge(rows: Sequence[Row]) -> Verdict | None:
        row = _find(rows, prefix, shards=2)
        if row is None or not row.reference_ms:
            return None
        return Verdict(row.ratio, f"{row.ratio:.3f}", row.ratio <= 1.10)
    return judge


def _w3(rows: Sequence[Row]) -> Verdict | None:
    row = _find(rows, "W3")
    return None if row is None else Verdict(row.service_ms, f"{row.service_ms:.2f} ms", row.service_ms <= 3.0)


def _w4(rows: Sequence[Row]) -> Verdict | None:
    row = _find(rows, "W4 gradient fetch")
    if row is None or not row.service_ms:
        return None
    rate = row.bytes_per_step / (row.service_ms / 1e3) / 1e9       # the whole call's median, as the table's note
    return Verdict(rate, f"{rate:.2f} GB/s", rate >= 1.0)


def _w5(rows: Sequence[Row]) -> Verdict | None:
    sizes = sorted({r.bytes_per_step for r in rows if r.workload.startswith("W5")})
    if not sizes:
        return None
    text = f"{sizes[0]:,} B" if len(sizes) == 1 else f"{sizes[0]:,}–{sizes[-1]:,} B"
    return Verdict(None, text, len(sizes) == 1)


TARGETS = (
    Target("W1 step / numpy step, 2 shards", "≤ 1.10", _ratio("W1")),
    Target("W2 step / numpy step, 2 shards", "≤ 1.10", _ratio("W2")),
    Target("W3 step, end to end", "≤ 3 ms", _w3),
    Target("W4 GetGradient of 1M float32, whole call", "≥ 1 GB/s", _w4),
    Target("W5 bytes per step, 10⁵ to 10⁷ parameters", "constant", _w5),
)


def verdict_table(runs: Sequence[Sequence[Row]]) -> str:
    """A Markdown table: each target's figure in every run, their median, and how often it was met."""
    n = len(runs)
    if n == 0:
        raise ValueError("no runs to judge")
    columns = ["measured"] if n == 1 else [f"run {k + 1}" for k in range(n)] + ["median"]
    lines = ["| target | goal | " + " | ".join(columns) + " | met |", "|---|---|" + "---|" * (len(columns) + 1)]
    for target in TARGETS:
        verdicts = [target.judge(rows) for rows in runs]
        if all(v is None for v in verdicts):
            continue                                   # a workload left out with --only
        cells = [v.text if v is not None else "–" for v in verdicts]
        judged = [v for v in verdicts if v is not None]
        met = sum(v.met for v in judged)
        if n > 1:
            values = [v.value for v in judged if v.value is not None]
            cells.append(_same_format(judged[0].text, statistics.median(values)) if values else "–")
            outcome = f"{met} of {len(judged)}"
        else:
            outcome = "yes" if met else "**no**"
        lines.append(f"| {target.name} | {target.goal} | " + " | ".join(cells) + f" | {outcome} |")
    return "\n".join(lines)


def _same_format(example: str, value: float) -> str:
    """`value` written as `example` is (three decimals for a ratio, two and the unit otherwise)."""
    if example.endswith(" ms"):
        return f"{value:.2f} ms"
    if example.endswith(" GB/s"):
        return f"{value:.2f} GB/s"
    return f"{value:.3f}"
