"""The benchmark harness (bench/): its reference is the service's math, its step workload
measures both sides in rounds, and `--write` keeps a results file's notes. A real server on
a real Ray; the figures themselves are never asserted (they belong to bench/RESULTS.md)."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from bench import workloads
from bench.run import write_keeping_notes
from workers.models import ModelSpec

MLP = dict(features=20, outputs=3, hidden=8, rows=16)


@pytest.fixture
def harness(server, monkeypatch):
    monkeypatch.setattr(workloads, "COORDINATOR", server[1])   # the labels come from the coordinator
    monkeypatch.setattr(workloads, "BLAS_SPIN_S", 0.0)


@pytest.mark.parametrize("model,hidden", [("mlp", 8), ("logistic", 0)])
def test_the_reference_step_is_the_services_step(harness, client, server, model, hidden):
    """Five full-batch SGD steps at learning rate 0.01 give the same parameters on both sides."""
    shape = dict(MLP, outputs=1 if model == "logistic" else 3, hidden=hidden)
    job = client.create_job(model, shards=2, seed=4, learning_rate=0.01, batch_size=0, **shape)
    try:
        spec = ModelSpec(model, shape["features"], shape["outputs"], hidden)
        ref = workloads.ReferenceStep(spec, shape["rows"], 4, server[1].jobs.get(job.job_id).y)
        before = client.get_params(job.job_id, flat=True)["flat"]
        np.testing.assert_array_equal(ref.theta, before)
        list(client.step(job.job_id, 5))
        assert len(ref.run(steps=4, warmup=1)) == 4
        after = client.get_params(job.job_id, flat=True)["flat"]
        assert np.abs(after - before).max() > 1e-4                 # the steps moved the parameters
        np.testing.assert_allclose(ref.theta, after, rtol=1e-5, atol=1e-6)
    finally:
        client.delete_job(job.job_id)


def test_the_step_workload_keeps_the_measured_steps_of_every_round(harness, client, server, monkeypatch):
    asked, runs = [], []
    step, run = client.step, workloads.ReferenceStep.run
    monkeypatch.setattr(client, "step", lambda job_id, n: asked.append(n) or step(job_id, n))
    monkeypatch.setattr(workloads.ReferenceStep, "run",
                        lambda self, steps, warmup: runs.append((steps, warmup)) or run(self, steps, warmup))
    row = workloads.step_workload(client, "tiny MLP", "mlp", shards=2, rounds=3, steps=4, warmup=2, **MLP)
    # each round: a Step call of warm-up + kept + 1 (its last step runs no next forward), 4 of them kept
    assert asked == [2 + 4 + 1] * 3 and runs == [(4, 2)] * 3 and row.samples == 3 * 4
    assert len(row.round_ratios) == 3 and row.ratio == statistics.median(row.round_ratios)
    assert row.note.endswith(f"ratio: median of 3 rounds' ({min(row.round_ratios):.2f}–{max(row.round_ratios):.2f})")
    assert row.workload == "tiny MLP" and row.shards == 2 and row.n_params == 8 * (20 + 1 + 3) + 3
    assert row.service_ms > 0 and row.reference_ms > 0 and row.service_spread_ms >= 0
    assert len(row.shard_ms) == 2 and all(0 < t <= row.service_ms for t in row.shard_ms)
    # DESIGN.md's byte count of a full-batch step with the next forward prefetched: dZ (16 x 3
    # float32) to each shard; Z_s and two 8-byte scalars back from each
    dz = MLP["rows"] * MLP["outputs"] * 4
    assert row.bytes_per_step == 2 * dz + 2 * (dz + 16) + 2 * 16


def test_a_service_step_is_timed_from_the_report_before_it(harness, client):
    """The clock read as each report arrives: k^2 ms for the k-th, so report k came 2k - 1 ms
    after the one before it. Each round's Step call answers 7 reports, of which 2-5 are kept."""
    ticks = iter(range(100))
    row = workloads.step_workload(client, "tiny MLP", "mlp", shards=2, rounds=3, steps=4, warmup=2,
                                  reference=False, clock=lambda: next(ticks) ** 2 / 1e3, **MLP)
    # rounds' kept gaps: 3, 5, 7, 9 | 17, 19, 21, 23 | 31, 33, 35, 37 ms
    assert row.service_ms == pytest.approx(20.0) and row.service_spread_ms == pytest.approx(25.0)
    assert row.note.startswith("coordinator step ") and row.samples == 12
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        workloads.step_workload(client, "tiny MLP", "mlp", shards=2, warmup=0, **MLP)


def test_the_rounds_ratios_are_given_by_their_range_and_middle_half():
    from bench.workloads import _range_and_middle
    assert _range_and_middle([1.2, 0.9, 1.0]) == "0.90–1.20"                 # three rounds: the range only
    # quartiles (statistics' exclusive method) of 1..4: 1.25 and 3.75; of 1..8: 2.25 and 6.75
    assert _range_and_middle([4.0, 1.0, 3.0, 2.0]) == "1.00–4.00, middle half 1.25–3.75"
    assert _range_and_middle([float(v) for v in range(8, 0, -1)]) == "1.00–8.00, middle half 2.25–6.75"


def test_every_w5_size_keeps_at_least_ten_steps_after_warm_up(monkeypatch):
    calls = []
    monkeypatch.setattr(workloads, "step_workload", lambda *a, **k: calls.append((a, k)) or workloads.Row(a[1], 2, 0))
    rows = workloads.bytes_vs_params(client=None)
    assert [a[3] + 1 for a, _ in calls] == [100_000, 1_000_000, 10_000_000] and len(rows) == 3
    assert all(k["rounds"] * k["steps"] >= 10 and k["warmup"] >= 1 and not k["reference"] for _, k in calls)


def test_write_keeps_the_notes_after_the_first_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_keeping_notes(str(path), "# Benchmark results\n\nold table\n")
    assert path.read_text() == "# Benchmark results\n\nold table\n"
    path.write_text(path.read_text() + "\n## Earlier runs\n\nrun A: 1.05\n\n## More\n")
    write_keeping_notes(str(path), "# Benchmark results\n\nnew table\n")
    assert path.read_text() == "# Benchmark results\n\nnew table\n\n## Earlier runs\n\nrun A: 1.05\n\n## More\n"
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]      # no temporary file left


def test_write_keeps_a_file_that_is_all_notes(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("## Notes\n\nkeep me\n")
    write_keeping_notes(str(path), "# Benchmark results\n\ntable\n")
    assert path.read_text() == "# Benchmark results\n\ntable\n\n## Notes\n\nkeep me\n"


def rows_of_a_run(w2_rounds, w4_ms, w5_bytes=(320, 320, 320)):
    from bench.workloads import Row
    rows = [Row("W1 logistic, batch 256", 1, 10, service_ms=4.0, reference_ms=2.0, round_ratios=[2.0]),  # not judged
            Row("W1 logistic, batch 256", 2, 10, service_ms=1.2, reference_ms=2.0, round_ratios=[0.6, 0.7, 0.5]),
            Row("W2 MLP 784-1250-10, batch 256", 2, 10, service_ms=7.7, reference_ms=7.0, round_ratios=w2_rounds),
            Row("W3 tiny model, end to end", 2, 10, service_ms=0.6),
            Row("W4 gradient fetch (GetGradient), 1M float32", 2, 10, service_ms=w4_ms, bytes_per_step=4_000_040),
            Row("W4 ceiling: bare gRPC, 1M float32", 0, 10, service_ms=1.0, bytes_per_step=4_000_000)]
    sizes = (10**5, 10**6, 10**7)
    return rows + [Row(f"W5 logistic {n:,} params", 2, n, bytes_per_step=b) for n, b in zip(sizes, w5_bytes)]


def verdicts(text):
    """{target name: its cells} from a verdict table."""
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in text.splitlines()[2:])}


def test_one_run_is_judged_against_every_target_to_three_decimals():
    from bench.targets import verdict_table
    # W2: the median of the rounds' ratios is 1.104, printed 1.10 in the table, and it misses 1.10
    table = verdicts(verdict_table([rows_of_a_run([1.2, 1.104, 1.0], w4_ms=4.0)]))
    assert table["W1 step / numpy step, 2 shards"] == ["≤ 1.10", "0.600", "yes"]
    assert table["W2 step / numpy step, 2 shards"] == ["≤ 1.10", "1.104", "**no**"]
    assert table["W3 step, end to end"] == ["≤ 3 ms", "0.60 ms", "yes"]
    # 4,000,040 bytes in 4 ms
    assert table["W4 GetGradient of 1M float32, whole call"] == ["≥ 1 GB/s", "1.000 GB/s", "yes"]
    assert table["W5 bytes per step, 10⁵ to 10⁷ parameters"] == ["constant", "320 B", "yes"]


def test_several_runs_give_each_figure_their_median_and_how_often_the_target_was_met():
    from bench.targets import verdict_table
    runs = [rows_of_a_run([1.0], w4_ms=3.2), rows_of_a_run([1.12], w4_ms=5.0, w5_bytes=(320, 320, 640)),
            rows_of_a_run([1.09], w4_ms=4.4)]
    text = verdict_table(runs)
    assert text.splitlines()[0] == "| target | goal | run 1 | run 2 | run 3 | median | met |"
    table = verdicts(text)
    assert table["W2 step / numpy step, 2 shards"] == ["≤ 1.10", "1.000", "1.120", "1.090", "1.090", "2 of 3"]
    assert table["W4 GetGradient of 1M float32, whole call"] == ["≥ 1 GB/s", "1.250 GB/s", "0.800 GB/s",
                                                                 "0.909 GB/s", "0.909 GB/s", "1 of 3"]
    assert table["W5 bytes per step, 10⁵ to 10⁷ parameters"] == ["constant", "320 B", "320–640 B", "320 B", "–",
                                                                  "2 of 3"]


def test_a_figure_is_judged_as_shown_and_a_workload_without_a_figure_is_a_miss():
    from bench.targets import verdict_table
    from bench.workloads import Row
    rows = rows_of_a_run([1.1004], w4_ms=4.0)                                # shown 1.100: met
    rows[4].service_ms = 0.0                                                 # W4 ran and gave nothing
    rows[1].service_ms = 0.0                                                 # nor did W1's service side
    rows = [r for r in rows if r.n_params != 10**7]                          # W5 without its largest size
    table = verdicts(verdict_table([rows]))
    assert table["W2 step / numpy step, 2 shards"] == ["≤ 1.10", "1.100", "yes"]
    assert table["W1 step / numpy step, 2 shards"] == ["≤ 1.10", "no figure", "**no**"]   # not a ratio of 0
    assert table["W4 GetGradient of 1M float32, whole call"] == ["≥ 1 GB/s", "no figure", "**no**"]
    assert table["W5 bytes per step, 10⁵ to 10⁷ parameters"] == ["constant", "no figure", "**no**"]
    # a pass that lacked a workload the other had: counted over both passes
    table = verdicts(verdict_table([[Row("W3 tiny model, end to end", 2, 10, service_ms=0.5)], []]))
    assert table["W3 step, end to end"] == ["≤ 3 ms", "0.50 ms", "no figure", "0.50 ms", "1 of 2"]
    assert verdict_table([[]]) == "No target of the performance issue was measured."


def test_a_workload_left_out_is_not_judged():
    from bench.targets import verdict_table
    from bench.workloads import Row
    text = verdict_table([[Row("W3 tiny model, end to end", 2, 10, service_ms=3.5)]])
    assert verdicts(text) == {"W3 step, end to end": ["≤ 3 ms", "3.50 ms", "**no**"]}
    with pytest.raises(ValueError):
        verdict_table([])


def test_the_bench_command_runs_twice_and_writes_the_verdict_then_each_run(server, tmp_path, capsys):
    from bench.run import main
    path = tmp_path / "RESULTS.md"
    path.write_text("# old head\n\n## Notes that stay\n\nkept\n")
    assert main(["--only", "W3", "--runs", "2", "--write", str(path)]) == 0
    text = path.read_text()
    head, notes = text.split("## Notes that stay")
    assert "--runs 2 --write" in head and "2 passes over the workloads" in " ".join(head.split())
    assert "| target | goal | run 1 | run 2 | median | met |" in head
    assert head.count("| W3 tiny model, end to end | 2 |") == 2
    assert head.index("### Run 1 of 2") < head.index("### Run 2 of 2") and notes.strip() == "kept"
    with pytest.raises(SystemExit):
        main(["--only", "W9"])
    assert "unknown workloads: W9" in capsys.readouterr().err
