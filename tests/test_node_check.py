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


def group_with_lines(shared_arrays_answer):
    """A RayShardGroup on two real shard lines (workers.channel) whose Ray answers are stand-ins."""
    import threading

    from workers.channel import ChannelServer
    servers = [ChannelServer(object(), "127.0.0.1", b"k" * 32) for _ in range(2)]
    group = object.__new__(RayShardGroup)
    group._authkey, group._channel_lock = b"k" * 32, threading.Lock()
    group._channels, group._channels_retry_at, group._nodes, group._shared = None, 0.0, [], None
    group.actors = [SimpleNamespace(open_channel=SimpleNamespace(remote=lambda key, a=s.address: a),
                                    shared_arrays=SimpleNamespace(remote=lambda: "shared_arrays")) for s in servers]
    group._ray = SimpleNamespace(get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "the coordinator's"))

    def get(refs, method):
        return refs if method == "open_channel" else shared_arrays_answer()
    group._get = get
    return group


def test_lines_whose_shards_cannot_say_their_nodes_are_closed_and_not_kept(monkeypatch):
    from service import shard_group
    from service.errors import ShardTimeout
    opened, real = [], shard_group.ShardChannels
    monkeypatch.setattr(shard_group, "ShardChannels", lambda *a, **k: opened.append(real(*a, **k)) or opened[-1])

    def slow():
        raise ShardTimeout("shards did not finish shared_arrays within 1 s")
    group = group_with_lines(slow)
    assert group._open_channels() is None                         # Ray calls for a while
    assert len(opened) == 1 and opened[0].closed                  # the half-opened lines are closed...
    assert group._channels is None and group._nodes == []         # ...and not kept without their nodes

    group = group_with_lines(lambda: [("node-a", {}), ("node-b", {})])
    assert group._open_channels() is opened[1] and group._nodes == ["node-a", "node-b"]
    group._close_channels()
    assert opened[1].closed and group._nodes == []


def restarting_group(outcomes, monkeypatch, timeout_s=30.0):
    """A RayShardGroup whose one shard is replaced (RayShardGroup._restart) with a stand-in for Ray
    and a clock of its own: each new actor's load meets the next of `outcomes` (an exception to
    raise, a number of seconds after which it dies, or None: loaded)."""
    import itertools

    from ray import exceptions

    from service import shard_group
    clock = [0.0]
    monkeypatch.setattr(shard_group, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    group = object.__new__(RayShardGroup)
    group._restart_timeout_s = timeout_s
    group.actors = ["the dead shard's actor"]
    started, killed, timeouts, outcomes = [], [], [], iter(outcomes)
    names = (f"replacement {k}" for k in itertools.count(1))

    def start(s):
        started.append(next(names))
        return SimpleNamespace(name=started[-1], load=SimpleNamespace(remote=lambda data: data))

    def get(ref, timeout):
        timeouts.append(timeout)
        outcome = next(outcomes)
        if isinstance(outcome, float):
            clock[0] += outcome
            outcome = exceptions.ActorDiedError()
        if outcome is not None:
            raise outcome
    group._start = start
    group._ray = SimpleNamespace(kill=lambda actor: killed.append(getattr(actor, "name", actor)), get=get,
                                 exceptions=exceptions)
    return group, started, killed, timeouts


def test_a_replacement_that_dies_while_it_starts_is_started_again(monkeypatch):
    """Its node lost (a vanished node, declared dead by Ray after the lines noticed): Ray moves the
    placement group's bundle to a live node, where the next replacement starts, in what is left
    of the restart timeout."""
    group, started, killed, timeouts = restarting_group([6.0, None], monkeypatch)
    group._restart(0, "the job's data")
    assert started == ["replacement 1", "replacement 2"]
    assert killed == ["the dead shard's actor", "replacement 1"]
    assert group.actors[0].name == "replacement 2"
    assert timeouts == [30.0, 24.0]


def test_a_replacement_whose_creation_raised_is_not_started_again(monkeypatch):
    from ray.exceptions import RayActorError
    failed = RayActorError(error_msg="__init__ raised", actor_init_failed=True)
    group, started, _, _ = restarting_group([failed], monkeypatch)
    with pytest.raises(ShardUnavailable, match="shard 0 died and could not be restarted within 30 s"):
        group._restart(0, "the job's data")
    assert started == ["replacement 1"]


def test_replacements_that_keep_dying_stop_at_the_restart_timeout(monkeypatch):
    group, started, _, timeouts = restarting_group([12.0, 20.0, 1.0], monkeypatch)
    with pytest.raises(ShardUnavailable, match=r"within 30 s \(ActorDiedError\)"):
        group._restart(0, "the job's data")
    assert started == ["replacement 1", "replacement 2"] and timeouts == [30.0, 18.0]


def test_replacements_that_die_at_once_stop_after_three(monkeypatch):
    group, started, _, _ = restarting_group([0.5] * 10, monkeypatch)
    with pytest.raises(ShardUnavailable, match=r"could not be restarted: 3 replacements died while starting "
                                                r"\(ActorDiedError\)"):
        group._restart(0, "the job's data")
    assert len(started) == 3


def test_a_replacement_that_does_not_load_in_time_is_a_dead_shard(monkeypatch):
    from ray.exceptions import GetTimeoutError
    group, started, _, _ = restarting_group([GetTimeoutError()], monkeypatch)
    with pytest.raises(ShardUnavailable, match=r"within 30 s \(GetTimeoutError\)"):
        group._restart(0, "the job's data")
    assert started == ["replacement 1"]
