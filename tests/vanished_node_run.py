"""Run by tests/test_multinode.py in its own process: a node whose network is cut under a running job.

A 3-node Ray cluster on this machine: the head and a worker node in this network namespace
(ray.cluster_utils.Cluster), and a third node (`ray start`) in a network namespace of its own,
reached through a veth pair, as a machine on the network would be. A SPREAD job puts a shard
there; then the namespace's end of the pair is set down. From then on nothing crosses: no FIN,
no RST, no answer to keepalives or retransmissions, as when a node loses power or its network.
Ray's health checks and the coordinator's call timeout keep their defaults, so what breaks the
silence is what a real deployment has. Needs root (ip netns); prints one JSON object of findings
({"skipped": why} when not run as root, {..., "error": what} when something failed).

    python tests/vanished_node_run.py NAME     NAME: the namespace (its veth ends: NAME + "h", NAME + "n")
"""
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")
import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import netns  # noqa: E402 - tests/, beside this script
from service.client import Client  # noqa: E402
from service.coordinator import Coordinator  # noqa: E402
from service.server import create_server, set_serving  # noqa: E402

STORE = 150 << 20
if len(sys.argv) != 2:
    sys.exit(f"usage: python {sys.argv[0]} NAME   (NAME: the network namespace to make, at most 14 characters)")
NS = sys.argv[1]
NET = f"198.18.{os.getpid() % 250}"                # a /30 of its own (the range set aside for network tests), .1 here, .2 there
HOST, NODE = f"{NET}.1", f"{NET}.2"
out = {}


def give_up() -> None:
    """Should this run hang: the namespace's processes and the cluster are ended, then the script
    (within 30 s, should the cluster's shutdown hang too)."""
    backstop = threading.Timer(30, os._exit, (3,))
    backstop.daemon = True
    backstop.start()
    print(json.dumps({**out, "error": "the run did not end within 270 s"}), flush=True)
    netns.remove(NS)
    try:
        cluster.shutdown()
    except Exception:                 # noqa: BLE001 - best effort, on the way out
        pass
    os._exit(3)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print(json.dumps({"skipped": "a network namespace needs root"}), flush=True)
        sys.exit(0)
    watchdog = threading.Timer(270, give_up)
    watchdog.daemon = True
    watchdog.start()
    cluster = remote_node = server = None
    try:
        netns.make(NS, HOST, NODE)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
        cluster.add_node(num_cpus=1, object_store_memory=STORE)
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        remote_node = subprocess.Popen(
            ["ip", "netns", "exec", NS, ray_cli, "start", f"--address={cluster.address}", f"--node-ip-address={NODE}",
             "--num-cpus=1", f"--object-store-memory={STORE}", "--block"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ray.init(address=cluster.address, log_to_driver=False)
        coordinator = Coordinator()                       # the default call timeout: 600 s
        server, port, health = create_server(coordinator, "127.0.0.1:0")
        set_serving(health)
        client = Client(f"127.0.0.1:{port}", timeout=600)
        deadline = time.monotonic() + 60
        while not any(n["Alive"] and n["NodeManagerAddress"] == NODE for n in ray.nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError("the node in the namespace did not join the cluster")
            time.sleep(0.5)
        victim = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == NODE)
        config = dict(shards=3, placement="SPREAD", dtype="float64", rows=40, features=9, outputs=3, seed=3,
                      checkpoint_every=2)
        job = client.create_job("softmax", **config)
        list(client.step(job.job_id, 3))
        out["victim_held_a_shard"] = victim in [s.node_id for s in job.shards]

        netns.cut(NS)                                                    # the node vanishes
        t0 = time.monotonic()
        out["steps"] = [r.step for r in client.step(job.job_id, 2)]       # recovers by itself, or fails
        out["step_call_seconds"] = time.monotonic() - t0
        out["nodes_after"] = [s.node_id for s in client.get_job(job.job_id).shards]
        out["victim"] = victim

        twin = client.create_job("softmax", **config)                     # the same job, never cut off
        list(client.step(twin.job_id, 5))
        out["same_parameters_as_a_job_never_cut_off"] = bool(np.array_equal(
            client.get_params(job.job_id, flat=True)["flat"], client.get_params(twin.job_id, flat=True)["flat"]))
    except Exception as exc:          # noqa: BLE001 - said in the findings, for the test to show
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        print(json.dumps(out), flush=True)
        netns.remove(NS)
        if remote_node is not None:
            try:
                remote_node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                remote_node.kill()
        if server is not None:
            server.stop(0)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        sys.stdout.flush()
