"""Prometheus metrics and structured logs, read from a real server over HTTP and from real log records."""
import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from service.coordinator import Coordinator
from service.logs import JsonFormatter
from service.metrics import Metrics
from service.server import create_server, set_serving


@pytest.fixture(scope="module")
def observed(ray_local):
    metrics = Metrics()
    coordinator = Coordinator(call_timeout_s=120, metrics=metrics)
    server, port, health = create_server(coordinator, "127.0.0.1:0")
    set_serving(health)
    metrics_port = metrics.serve(0)
    with Client(f"127.0.0.1:{port}", timeout=120) as client:
        yield client, f"http://127.0.0.1:{metrics_port}/metrics"
    server.stop(0)
    coordinator.close()


def scrape(url):
    """{(name, labels as a sorted tuple): value} of every sample."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_steps_bytes_shard_times_jobs_and_failures(observed):
    client, url = observed
    job = client.create_job("softmax", shards=3, rows=64, features=12, outputs=4, batch_size=16)
    reports = list(client.step(job.job_id, 5)) + [e.report for e in client.train(job.job_id, steps=3)]
    with pytest.raises(grpc.RpcError):
        client.get_job("job-missing")
    m = scrape(url)
    jid = (("job_id", job.job_id),)
    assert m[("gradshard_steps_total", jid)] == 8
    assert m[("gradshard_step_seconds_count", jid)] == 8
    assert m[("gradshard_step_seconds_sum", jid)] == pytest.approx(sum(r.seconds for r in reports), rel=1e-6)
    assert m[("gradshard_shard_bytes_total", (("direction", "to_shards"),) + jid)] == \
        sum(r.bytes_to_shards for r in reports)
    assert m[("gradshard_shard_bytes_total", (("direction", "from_shards"),) + jid)] == \
        sum(r.bytes_from_shards for r in reports)
    for shard in range(3):     # per-shard compute time, so a slow shard can be named
        key = ("gradshard_shard_compute_seconds_sum", (("job_id", job.job_id), ("shard", str(shard))))
        assert m[key] == pytest.approx(sum(r.shard_seconds[shard] for r in reports), rel=1e-6)
    assert m[("gradshard_active_jobs", ())] == 1
    assert m[("gradshard_failed_calls_total", (("code", "NOT_FOUND"), ("method", "GetJob")))] == 1
    assert m[("gradshard_rpc_seconds_count", (("method", "Step"),))] == 1
    client.delete_job(job.job_id)
    after = scrape(url)
    assert after[("gradshard_active_jobs", ())] == 0
    assert ("gradshard_steps_total", jid) not in after          # a deleted job's series are dropped


def test_json_logs_carry_job_and_step_ids(observed):
    client, _ = observed
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(JsonFormatter().format(record))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        job = client.create_job("linear", rows=20, features=3, holdout_fraction=0.25)
        list(client.train(job.job_id, steps=2))
        with pytest.raises(grpc.RpcError):
            client.evaluate(job.job_id, rows=[99])
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    entries = [json.loads(r) for r in records]
    mine = [e for e in entries if e.get("job_id") == job.job_id]
    assert any(e["message"].startswith("created") for e in mine)
    assert [e["step"] for e in mine if e["logger"] == "service.coordinator" and "loss" in e["message"]
            and e["level"] == "DEBUG"] == [1, 2]
    refused = [e for e in entries if e.get("method") == "Evaluate"]
    assert refused and refused[0]["code"] == "INVALID_ARGUMENT" and "batch.rows" in refused[0]["message"]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    client.delete_job(job.job_id)
