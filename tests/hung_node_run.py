"""Run by tests/test_multinode.py in its own process: a node that hangs under a running job.

A 3-node Ray cluster on this machine (ray.cluster_utils.Cluster), a real gRPC server joined to
it, a SPREAD job with a shard on a worker node, and that node's raylet and every process under
it (the shard's among them) stopped with SIGSTOP. A stopped node sends nothing, not even a FIN,
and its kernel still answers TCP's keepalives: the coordinator's line to the shard stays open
and silent, as to a node that hangs (or vanishes, until keepalive gives up). Ray's health checks
are shortened here (about 5 s to declare a node dead instead of about a minute), so that the
coordinator's call timeout (60 s) is much longer than Ray's verdict. Prints one JSON object of
findings.
"""
import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from service.client import Client  # noqa: E402
from service.coordinator import Coordinator  # noqa: E402
from service.server import create_server, set_serving  # noqa: E402

STORE = 150 << 20
CALL_TIMEOUT_S = 60
HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
out = {"call_timeout_s": CALL_TIMEOUT_S}
stopped = []


def kill_stopped() -> None:
    for p in stopped:
        try:
            p.kill()
        except psutil.Error:
            pass


def give_up() -> None:
    """Should this run hang: the stopped processes (they would outlive a killed script) and the
    cluster are ended, then the script (within 30 s, should the cluster's shutdown hang too)."""
    backstop = threading.Timer(30, os._exit, (3,))
    backstop.daemon = True
    backstop.start()
    kill_stopped()
    try:
        cluster.shutdown()
    except Exception:                 # noqa: BLE001 - best effort, on the way out
        pass
    os._exit(3)


watchdog = threading.Timer(240, give_up)
watchdog.daemon = True
watchdog.start()
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                        "_system_config": HEALTH_CHECKS})
workers = [cluster.add_node(num_cpus=1, object_store_memory=STORE) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
coordinator = Coordinator(call_timeout_s=CALL_TIMEOUT_S, placement_timeout_s=40)
server, port, health = create_server(coordinator, "127.0.0.1:0")
set_serving(health)
client = Client(f"127.0.0.1:{port}", timeout=300)
try:
    config = dict(shards=3, placement="SPREAD", dtype="float64", rows=40, features=9, outputs=3, seed=3,
                  checkpoint_every=2)
    job = client.create_job("softmax", **config)
    list(client.step(job.job_id, 3))
    nodes = [s.node_id for s in job.shards]
    victim = next(n for n in workers if n.node_id in nodes)         # SPREAD: a worker node holds a shard
    raylet = psutil.Process(victim.all_processes["raylet"][0].process.pid)
    for p in [raylet, *raylet.children(recursive=True)]:
        p.send_signal(signal.SIGSTOP)
        stopped.append(p)
    out["stopped"] = sorted(p.name() for p in stopped)

    t0 = time.monotonic()
    out["steps"] = [r.step for r in client.step(job.job_id, 2)]       # recovers by itself, or fails
    out["step_call_seconds"] = time.monotonic() - t0
    out["nodes_after"] = [s.node_id for s in client.get_job(job.job_id).shards]
    out["victim"] = victim.node_id

    twin = client.create_job("softmax", **config)                     # the same job, never hung
    list(client.step(twin.job_id, 5))
    out["same_parameters_as_a_job_never_hung"] = bool(np.array_equal(
        client.get_params(job.job_id, flat=True)["flat"], client.get_params(twin.job_id, flat=True)["flat"]))
finally:
    print(json.dumps(out), flush=True)
    kill_stopped()
    server.stop(0)
    ray.shutdown()
    cluster.shutdown()
    sys.stdout.flush()
