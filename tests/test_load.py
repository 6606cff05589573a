"""Bounded load on loopback (bench/load.py): 16 concurrent clients for 20 seconds, mixed calls on
several jobs of a real server over a real Ray. Only documented statuses may come back; the
latency figures are printed (and kept in bench/RESULTS.md), never asserted."""
from bench.load import report, run_load


def test_sixteen_clients_for_twenty_seconds_see_only_documented_statuses(server, client, capsys):
    jobs = [client.create_job("softmax", features=100, outputs=5, rows=256, shards=2, batch_size=32, seed=k).job_id
            for k in range(3)]
    stats = run_load(server[0], jobs, clients=16, seconds=20)
    with capsys.disabled():
        print("\n" + report(stats))
    assert stats["undocumented"] == {}
    kinds = {name for name, _ in stats["statuses"]}
    assert kinds == {"GetJob", "Step", "ComputeGradient", "Evaluate", "GetParameters", "ListJobs", "GetJob unknown"}
    assert stats["statuses"][("GetJob unknown", "NOT_FOUND")] > 0 and stats["calls"] > 500
    steps_seen = stats["statuses"][("Step", "OK")]
    assert sum(client.get_job(j).step for j in jobs) == steps_seen    # every acknowledged step applied once
    for j in jobs:
        client.delete_job(j)
