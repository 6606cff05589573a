"""Run by tests/test_multinode.py in its own process: a node whose network is cut under a running job.

A 3-node Ray cluster on this machine: the head and a worker node in this network namespace
(ray.cluster_utils.Cluster), and a third node (`ray start`) in a network namespace of its own,
reached through a veth pair, as a machine on the network would be. A SPREAD job puts a shard
there; then the namespace's end of the pair is set down. From then on nothing crosses: no FIN,
no RST, no answer to keepalives or retransmissions, as when a node loses power or its network.
Ray's health checks and the coordinator's call timeout keep their defaults, so what breaks the
silence is what a real deployment has. Needs root (ip netns); prints one JSON object of findings.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")
import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from service.client import Client  # noqa: E402
from service.coordinator import Coordinator  # noqa: E402
from service.server import create_server, set_serving  # noqa: E402

STORE = 150 << 20
NS = f"gsv{os.getpid() % 100_000}"                  # the namespace; its veth ends are NS + "h", NS + "n"
NET = f"10.231.{os.getpid() % 250}"                 # a /30 of its own: .1 on this side, .2 in the namespace
HOST, NODE = f"{NET}.1", f"{NET}.2"
out = {}


def ip(*args: str, ns: bool = False) -> None:
    cmd = ["ip", "netns", "exec", NS, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True)


def make_namespace() -> None:
    ip("netns", "add", NS)
    ip("link", "add", NS + "h", "type", "veth", "peer", "name", NS + "n")
    ip("link", "set", NS + "n", "netns", NS)
    ip("addr", "add", f"{HOST}/30", "dev", NS + "h")
    ip("link", "set", NS + "h", "up")
    ip("addr", "add", f"{NODE}/30", "dev", NS + "n", ns=True)
    ip("link", "set", NS + "n", "up", ns=True)
    ip("link", "set", "lo", "up", ns=True)
    ip("route", "add", "default", "via", HOST, ns=True)     # the other nodes' own addresses


def remove_namespace() -> None:
    """Every process in the namespace (the cut-off node's raylet, its shard...) and the namespace."""
    pids = subprocess.run(["ip", "netns", "pids", NS], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)      # takes the veth pair with it


def give_up() -> None:
    """Should this run hang: the namespace's processes and the cluster are ended, then the script
    (within 30 s, should the cluster's shutdown hang too)."""
    backstop = threading.Timer(30, os._exit, (3,))
    backstop.daemon = True
    backstop.start()
    remove_namespace()
    try:
        cluster.shutdown()
    except Exception:                 # noqa: BLE001 - best effort, on the way out
        pass
    os._exit(3)


watchdog = threading.Timer(270, give_up)
watchdog.daemon = True
watchdog.start()
make_namespace()
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
try:
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

    ip("link", "set", NS + "n", "down", ns=True)                     # the node vanishes
    t0 = time.monotonic()
    out["steps"] = [r.step for r in client.step(job.job_id, 2)]       # recovers by itself, or fails
    out["step_call_seconds"] = time.monotonic() - t0
    out["nodes_after"] = [s.node_id for s in client.get_job(job.job_id).shards]
    out["victim"] = victim

    twin = client.create_job("softmax", **config)                     # the same job, never cut off
    list(client.step(twin.job_id, 5))
    out["same_parameters_as_a_job_never_cut_off"] = bool(np.array_equal(
        client.get_params(job.job_id, flat=True)["flat"], client.get_params(twin.job_id, flat=True)["flat"]))
finally:
    print(json.dumps(out), flush=True)
    remove_namespace()
    remote_node.wait(timeout=30)
    server.stop(0)
    ray.shutdown()
    cluster.shutdown()
    sys.stdout.flush()
