"""The performance issue's targets, judged on a benchmark run's rows (bench.workloads.Row).

`gradshard bench` prints this verdict before its table; with `--runs N` it judges every run
and says in how many of them each target was met. A figure is judged as it is shown: ratios
and GB/s to three decimals (a median ratio of 1.104 is printed 1.10 in the table, and misses
a target of 1.10 here), milliseconds to two. A workload that ran but gave no figure counts as
a miss. No numpy, no Ray, no gRPC: a row is read by its workload's name and its shard count.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

from bench.workloads import Row


@dataclass(frozen=True)
class Verdict:
    value: float | None     # what is compared (None: no single number, as for W5)
    text: str               # how it is shown
    met: bool
    decimals: int = 0       # how a figure of this kind is written (a median across runs too)
    unit: str = ""

    def show(self, value: float) -> str:
        return f"{value:.{self.decimals}f}{self.unit}"


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    judge: Callable[[Sequence[Row]], Verdict | None]     # None: the run did not include the workload


def _find(rows: Sequence[Row], prefix: str, shards: int | None = None) -> Row | None:
    return next((r for r in rows if r.workload.startswith(prefix) and shards in (None, r.shards)), None)


NO_FIGURE = Verdict(None, "no figure", False)     # the workload ran, but its row holds nothing to judge
W5_PARAMS = {10**5, 10**6, 10**7}


def _shown(value: float, decimals: int, unit: str, met: Callable[[float], bool]) -> Verdict:
    """The figure rounded as it is shown, and judged so."""
    shown = round(value, decimals)
    return Verdict(shown, f"{shown:.{decimals}f}{unit}", met(shown), decimals, unit)


def _ratio(prefix: str) -> Callable[[Sequence[Row]], Verdict | None]:
    def judge(rows: Sequence[Row]) -> Verdict | None:
        row = _find(rows, prefix, shards=2)
        if row is None:
            return None
        if not (row.reference_ms and row.service_ms and math.isfinite(row.ratio) and row.ratio > 0):
            return NO_FIGURE
        return _shown(row.ratio, 3, "", lambda v: v <= 1.10)
    return judge


def _w3(rows: Sequence[Row]) -> Verdict | None:
    row = _find(rows, "W3")
    if row is None:
        return None
    return _shown(row.service_ms, 2, " ms", lambda v: v <= 3.0) if row.service_ms else NO_FIGURE


def _w4(rows: Sequence[Row]) -> Verdict | None:
    row = _find(rows, "W4 gradient fetch")
    if row is None:
        return None
    if not row.service_ms or not row.bytes_per_step:
        return NO_FIGURE
    rate = row.bytes_per_step / (row.service_ms / 1e3) / 1e9      # the whole call's median, as the note's
    return _shown(rate, 3, " GB/s", lambda v: v >= 1.0)


def _w5(rows: Sequence[Row]) -> Verdict | None:
    w5 = [r for r in rows if r.workload.startswith("W5")]
    if not w5:
        return None
    if {r.n_params for r in w5} != W5_PARAMS or not all(r.bytes_per_step > 0 for r in w5):
        return NO_FIGURE                                     # constant across what it was not measured on?
    sizes = sorted({r.bytes_per_step for r in w5})
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
    judged = 0
    for target in TARGETS:
        verdicts = [target.judge(rows) for rows in runs]
        if all(v is None for v in verdicts):
            continue                                   # a workload left out with --only
        judged += 1
        verdicts = [NO_FIGURE if v is None else v for v in verdicts]    # a pass that lacked it: a miss
        cells = [v.text for v in verdicts]
        met = sum(v.met for v in verdicts)
        if n > 1:
            figures = [v for v in verdicts if v.value is not None]
            cells.append(figures[0].show(statistics.median(v.value for v in figures)) if figures else "–")
            outcome = f"{met} of {n}"
        else:
            outcome = "yes" if met else "**no**"
        lines.append(f"| {target.name} | {target.goal} | " + " | ".join(cells) + f" | {outcome} |")
    return "\n".join(lines) if judged else "No target of the performance issue was measured."

