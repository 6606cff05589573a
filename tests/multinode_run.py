"""Run by tests/test_multinode.py in its own process: a 3-node Ray cluster on this machine
(ray.cluster_utils.Cluster: one head and two worker raylets), a real gRPC server joined to it,
and a job whose shards are spread over the nodes. Prints one JSON object of findings."""
import json
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from service.client import Client  # noqa: E402
from service.coordinator import Coordinator  # noqa: E402
from service.jobs import JobConfig  # noqa: E402
from service.server import create_server, set_serving  # noqa: E402
from service.shard_group import LocalShardGroup  # noqa: E402
from workers.shard import DataSpec  # noqa: E402

STORE = 150 << 20
out = {}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
workers = [cluster.add_node(num_cpus=1, object_store_memory=STORE) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
out["nodes"] = sum(1 for n in ray.nodes() if n["Alive"])

# Ray declares a node dead after its health checks fail for some seconds; only then can a
# placement-group bundle move to another node, so a restart may wait that long.
coordinator = Coordinator(call_timeout_s=60, placement_timeout_s=40)
server, port, health = create_server(coordinator, "127.0.0.1:0")
set_serving(health)
client = Client(f"127.0.0.1:{port}", timeout=120)
try:
    job = client.create_job("softmax", shards=3, placement="STRICT_SPREAD", dtype="float64", rows=40, features=9,
                            outputs=3, seed=2)
    out["shard_nodes"] = [s.node_id for s in job.shards]
    out["placement"] = job.placement
    _, grads = client.gradient(job.job_id, flat=True)
    single = Coordinator(LocalShardGroup)          # the same job in one process, for reference
    twin = single.create_job(JobConfig("softmax", DataSpec("synthetic", rows=40, seed=2), features=9, outputs=3,
                                       shards=3, dtype="float64", seed=2))
    out["max_grad_diff"] = float(np.max(np.abs(grads["flat"] - single.gradient(twin.job_id).grad)))

    try:
        client.create_job("softmax", shards=4, placement="STRICT_SPREAD", rows=10, features=9, outputs=3)
    except grpc.RpcError as e:
        out["four_strict"] = [e.code().name, e.details()]

    # A second job, SPREAD: its bundles may move to the surviving nodes, so it can recover.
    spread = client.create_job("softmax", shards=3, placement="SPREAD", dtype="float64", rows=40, features=9,
                               outputs=3, seed=3, checkpoint_every=2)
    list(client.step(spread.job_id, 3))
    _, spread_before = client.gradient(spread.job_id, flat=True)
    out["spread_nodes"] = [s.node_id for s in spread.shards]

    # Remove a worker node that holds a shard, without a graceful shutdown.
    on_workers = [s for s in job.shards if any(n.node_id == s.node_id for n in workers)]
    out["victim_shard"] = on_workers[0].index
    victim = next(n for n in workers if n.node_id == on_workers[0].node_id)
    cluster.remove_node(victim, allow_graceful=False)
    # The node's processes die within moments; call until the job notices (a bounded wait).
    statuses, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 90 and len(statuses) < 2:
        try:
            client.gradient(job.job_id)
        except grpc.RpcError as e:
            statuses.append([e.code().name, e.details()])
        time.sleep(0.2)
    out["after_removal"] = statuses
    out["after_removal_seconds"] = time.monotonic() - t0
    out["job_error"] = client.get_job(job.job_id).error
    spread_statuses, spread_after = [], {"flat": None}
    for _ in range(3):
        try:
            _, spread_after = client.gradient(spread.job_id, flat=True)
            spread_statuses.append("OK")
            break
        except grpc.RpcError as e:
            spread_statuses.append(e.code().name)
    out["spread_after_removal"] = spread_statuses
    out["spread_same_gradient"] = bool(np.array_equal(spread_after["flat"], spread_before["flat"]))
    out["spread_steps_after"] = [r.step for r in client.step(spread.job_id, 2)]
    out["spread_nodes_after"] = [s.node_id for s in client.get_job(spread.job_id).shards]
    out["removed_node"] = victim.node_id
finally:
    print(json.dumps(out), flush=True)
    server.stop(0)
    ray.shutdown()
    cluster.shutdown()
    sys.stdout.flush()
