"""What the coordinator asks Ray while a call on the lines waits long (RayShardGroup._nodes_alive),
with a stand-in for Ray's node table: the multi-node test runs the real one (test_multinode.py)."""
from types import SimpleNamespace

import pytest

from service.errors import ShardUnavailable
from service.shard_group import RayShardGroup


def check_with(nodes_answer):
    group = object.__new__(RayShardGroup)             # only its Ray is read
    group._ray = SimpleNamespace(nodes=nodes_answer)
    return group._nodes_alive("backward_apply", ["node-a", "node-b", "node-a"])


def test_nodes_that_ray_holds_alive_let_the_wait_go_on():
    check_with(lambda: [{"NodeID": "node-a", "Alive": True}, {"NodeID": "node-b", "Alive": True}])()


@pytest.mark.parametrize("table", [
    [{"NodeID": "node-a", "Alive": True}, {"NodeID": "node-b", "Alive": False}],     # declared dead
    [{"NodeID": "node-a", "Alive": True}],                                             # no longer listed
], ids=["dead", "gone from the table"])
def test_a_node_ray_declared_dead_ends_the_wait_as_a_dead_shard(table):
    with pytest.raises(ShardUnavailable, match=r"the node of shard 1 is gone .* during backward_apply; retry"):
        check_with(lambda: table)()


def test_a_ray_that_cannot_answer_lets_the_wait_go_on():
    def unreachable():
        raise ConnectionError("GCS unreachable")
    check_with(unreachable)()                         # the call's own timeout still bounds the wait
