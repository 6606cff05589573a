"""The direct line from the coordinator to the shards (workers.channel), on real sockets,
with plain objects behind it: what Ray would run is tested in the API and lifecycle tests."""
from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import threading
import time

import numpy as np
import pytest

from workers.channel import ChannelLost, ChannelServer, ChannelTimeout, RemoteError, ShardChannels, locked, readable

KEY = b"k" * 32


class Target:
    def __init__(self, index: int) -> None:
        self.index = index

    def forward(self, token, rows=None, scale=1.0):
        return np.arange(3.0) * scale + self.index, token

    def backward(self, token, dZ):
        raise ValueError(f"shard {self.index}: no forward for call {token}")

    def apply(self, seconds):
        time.sleep(seconds)
        return self.index

    def pid(self):
        return os.getpid()


def servers(n=2):
    return [ChannelServer(Target(s), "127.0.0.1", KEY) for s in range(n)]


def test_calls_reach_every_shard_in_order_with_their_own_arguments():
    lines = ShardChannels([s.address for s in servers(3)], KEY)
    out = lines.call("forward", (7,), {"rows": None}, [{"scale": 1.0}, {"scale": 2.0}, {"scale": 3.0}], 5.0)
    for s, (z, token) in enumerate(out):
        np.testing.assert_array_equal(z, np.arange(3.0) * (s + 1) + s)
        assert token == 7
    lines.close()


def test_a_shard_exception_comes_back_as_itself_and_the_lines_stay_usable():
    lines = ShardChannels([s.address for s in servers()], KEY)
    with pytest.raises(RemoteError) as e:
        lines.call("backward", (3, None), {}, None, 5.0)
    assert isinstance(e.value.cause, ValueError) and "no forward for call 3" in str(e.value.cause)
    assert e.value.shard == 0
    assert [token for _, token in lines.call("forward", (4,), {}, None, 5.0)] == [4, 4]   # still in step


def test_only_the_listed_calls_can_be_made():
    lines = ShardChannels([s.address for s in servers(1)], KEY)
    with pytest.raises(RemoteError) as e:
        lines.call("pid", (), {}, None, 5.0)
    assert isinstance(e.value.cause, ValueError) and "'pid' is not a channel call" in str(e.value.cause)


def test_a_wrong_key_is_refused_and_the_server_serves_the_right_one_after():
    from multiprocessing import AuthenticationError
    (server,) = servers(1)
    with pytest.raises(AuthenticationError):
        ShardChannels([server.address], b"x" * 32)
    lines = ShardChannels([server.address], KEY)
    assert lines.call("apply", (0.0,), {}, None, 5.0) == [0]


def test_a_slow_shard_times_out_closes_the_lines_and_a_new_connection_works():
    srv = servers(2)
    lines = ShardChannels([s.address for s in srv], KEY)
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout, match="did not finish apply within 0.2 s"):
        lines.call("apply", (1.0,), {}, None, 0.2)
    assert time.monotonic() - t0 < 0.9 and lines.closed
    again = ShardChannels([s.address for s in srv], KEY)      # served once the slow call is done
    assert again.call("apply", (0.0,), {}, None, 5.0) == [0, 1]


class NodeGone(Exception):
    pass


def test_a_long_wait_asks_its_check_and_ends_when_the_check_raises():
    """What the coordinator does for a shard whose node hangs: the line is open and silent,
    and the check (Ray's view of the nodes, in the service) ends the wait long before the timeout."""
    lines = ShardChannels([s.address for s in servers(2)], KEY)
    checks = []

    def check():
        checks.append(time.monotonic())
        if len(checks) == 3:
            raise NodeGone("shard 1's node is gone")

    t0 = time.monotonic()
    lines.start("apply", (3.0,), {}, None)
    with pytest.raises(NodeGone):
        lines.finish("apply", 30.0, check, check_every_s=0.1)
    assert len(checks) == 3 and 0.25 < checks[-1] - t0 < 1.5      # every 0.1 s, not at the 30 s timeout
    assert lines.closed                                            # the late answer must not be read as the next


def test_a_check_that_finds_nothing_leaves_the_answer_and_the_timeout_as_they_were():
    srv = servers(2)
    lines = ShardChannels([s.address for s in srv], KEY)
    checks = []
    lines.start("apply", (0.5,), {}, None)
    assert lines.finish("apply", 5.0, lambda: checks.append(1), check_every_s=0.1) == [0, 1]
    assert 2 <= len(checks) <= 10                                  # asked while the shards worked 0.5 s
    t0 = time.monotonic()
    lines.start("apply", (1.0,), {}, None)
    with pytest.raises(ChannelTimeout, match="within 0.3 s"):
        lines.finish("apply", 0.3, lambda: None, check_every_s=0.1)
    assert time.monotonic() - t0 < 0.9 and lines.closed


def test_a_slow_check_does_not_stretch_the_timeout_and_a_check_needs_an_interval():
    lines = ShardChannels([s.address for s in servers(2)], KEY)
    t0 = time.monotonic()
    lines.start("apply", (2.0,), {}, None)
    with pytest.raises(ChannelTimeout):
        lines.finish("apply", 0.2, lambda: time.sleep(0.3), check_every_s=0.05)   # the check outlasts the timeout
    assert time.monotonic() - t0 < 0.8 and lines.closed
    lines = ShardChannels([s.address for s in servers(1)], KEY)
    lines.start("apply", (0.0,), {}, None)
    with pytest.raises(ValueError, match="check_every_s must be > 0"):
        lines.finish("apply", 1.0, lambda: None, check_every_s=0)
    assert lines.closed                                            # the answer sent was never read


def test_an_answer_that_comes_during_a_check_past_the_deadline_is_taken():
    lines = ShardChannels([s.address for s in servers(2)], KEY)
    lines.start("apply", (0.25,), {}, None)                        # answers come at 0.25 s
    # the check returns only once both answers are in: past the deadline of 0.2 s, whatever the load
    assert lines.finish("apply", 0.2, lambda: [readable(c, 5.0) for c in lines.conns], check_every_s=0.05) == [0, 1]
    assert not lines.closed


def _serve_in_child(queue):
    server = ChannelServer(Target(0), "127.0.0.1", KEY)
    queue.put(server.address)
    time.sleep(60)


def test_a_shard_process_that_dies_mid_call_is_a_lost_line():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_serve_in_child, args=(queue,), daemon=True)
    child.start()
    lines = ShardChannels([queue.get(timeout=30)], KEY)
    threading.Timer(0.3, child.kill).start()
    with pytest.raises(ChannelLost) as e:
        lines.call("apply", (5.0,), {}, None, 30.0)
    assert not isinstance(e.value, ChannelTimeout) and lines.closed
    child.join(5)


def test_readable_waits_for_a_frame_or_the_end_of_the_line_and_no_longer_than_asked():
    here, there = multiprocessing.Pipe()
    t0 = time.monotonic()
    assert not readable(here, 0.15)
    assert 0.14 <= time.monotonic() - t0 < 2
    assert not readable(here, -1.0)              # a deadline already past: a look, no wait
    there.send_bytes(b"x")
    assert readable(here, 0.0) and here.recv_bytes() == b"x"
    threading.Timer(0.1, there.close).start()
    t0 = time.monotonic()
    assert readable(here, 5.0)                   # the far end closing ends the wait: EOF is there to read
    assert time.monotonic() - t0 < 2
    with pytest.raises(EOFError):
        here.recv_bytes()
    here.close()


def test_readable_takes_a_wait_longer_than_poll_can_express():
    here, there = multiprocessing.Pipe()
    there.send_bytes(b"x")
    assert readable(here, math.inf) and readable(here, 1e12)      # poll() alone overflows beyond 24.8 days
    here.close(), there.close()


def test_locked_methods_take_turns_and_may_call_each_other():
    class Counter:
        def __init__(self):
            self._lock = threading.RLock()
            self.n = 0

        def bump(self):
            n = self.n
            time.sleep(0.001)
            self.n = n + 1

        def bump_twice(self):
            self.bump()
            self.bump()

    Counter.bump, Counter.bump_twice = locked(Counter.bump), locked(Counter.bump_twice)
    c = Counter()
    threads = [threading.Thread(target=c.bump_twice) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.n == 16


class Echo:
    def get_params(self, *arrays):
        return arrays

    def set_params(self, theta):
        theta += 1                        # the received array is writable memory of its own
        return theta


def test_large_arrays_travel_out_of_band_and_arrive_whole_and_writable():
    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((300, 1000)), rng.standard_normal(7).astype(np.float32)
    server = ChannelServer(Echo(), "127.0.0.1", KEY)
    lines = ShardChannels([server.address], KEY)
    ((got_big, got_small, view),) = lines.call("get_params", (big, small, big[:, ::2]), {}, None, 5.0)
    np.testing.assert_array_equal(got_big, big)
    np.testing.assert_array_equal(got_small, small)
    np.testing.assert_array_equal(view, big[:, ::2])                # a strided view, pickled in band
    assert got_small.dtype == np.float32 and got_big.flags.writeable
    (plus_one,) = lines.call("set_params", (big,), {}, None, 5.0)
    np.testing.assert_array_equal(plus_one, big + 1)


def test_a_call_the_same_for_every_shard_is_encoded_once_and_reaches_each_whole(monkeypatch):
    import workers.channel as channel
    encoded = []
    encode = channel.encode
    monkeypatch.setattr(channel, "encode", lambda obj: encoded.append(obj[0]) or encode(obj))
    calls = lambda: [m for m in encoded if m not in ("ok", "error")]   # noqa: E731 (the shards' answers too)
    rng = np.random.default_rng(1)
    big, small = rng.standard_normal((300, 1000)), rng.standard_normal((256, 10)).astype(np.float32)
    lines = ShardChannels([ChannelServer(Echo(), "127.0.0.1", KEY).address for _ in range(3)], KEY)
    out = lines.call("get_params", (big, small), {}, None, 5.0)       # no per-shard arguments
    assert calls() == ["get_params"]                                  # one encoding, large buffer included
    assert len(out) == 3
    for got_big, got_small in out:
        np.testing.assert_array_equal(got_big, big)
        np.testing.assert_array_equal(got_small, small)
    encoded.clear()
    pluses = lines.call("set_params", (), {}, [{"theta": big * s} for s in range(3)], 5.0)
    assert calls() == ["set_params"] * 3                              # each shard its own arguments
    for s, plus_one in enumerate(pluses):
        np.testing.assert_array_equal(plus_one, big * s + 1)


@pytest.mark.parametrize("frame", [
    b"",                                                   # empty
    b"\x00",                                               # a kind and no pickle
    b"\x01",
    b"\x00not a pickle",
    b"\x00" + pickle.dumps(("apply", (0.0,), {}))[:-3],     # a truncated pickle
    b"\x01" + pickle.dumps("x"),                            # not (head, sizes)
    b"\x01" + pickle.dumps((b"", [-1])),                    # a negative size
    b"\x07" + pickle.dumps(("apply", (0.0,), {})),          # a good message behind an unknown kind
    pickle.dumps(("apply", (0.0,), {})),                   # no kind at all (0x80, pickle's first byte)
], ids=["empty", "plain-only", "buffers-only", "not-a-pickle", "truncated", "not-head-sizes", "negative-size",
        "unknown-kind", "no-kind"])
def test_a_frame_that_is_not_the_lines_drops_that_connection_only(frame, caplog):
    from workers.channel import connect, receive, send
    (server,) = servers(1)
    bad = connect(server.address, KEY, 5.0)
    send(bad, ("apply", (0.0,), {}))                        # answered: the server is serving `bad` now,
    assert receive(bad) == ("ok", 0)                        # so the next connection queues behind it
    waiting = ShardChannels([server.address], KEY)
    with caplog.at_level("WARNING", logger="workers.channel"):
        bad.send_bytes(frame)
        with pytest.raises(EOFError):
            bad.recv_bytes()                                # the server hung up on it
        assert waiting.call("apply", (0.0,), {}, None, 5.0) == [0]
    assert "dropped the connection" in caplog.text


def test_a_silent_peer_does_not_hold_the_server():
    import socket
    server = ChannelServer(Target(0), "127.0.0.1", KEY, handshake_timeout_s=0.3)
    silent = socket.create_connection(server.address)                # connects, never answers
    t0 = time.monotonic()
    lines = ShardChannels([server.address], KEY)
    assert lines.call("apply", (0.0,), {}, None, 5.0) == [0]
    assert time.monotonic() - t0 < 3.0
    silent.close()


def test_connecting_to_a_port_that_never_answers_times_out():
    import socket
    mute = socket.create_server(("127.0.0.1", 0))                    # accepts (backlog), never speaks
    t0 = time.monotonic()
    with pytest.raises(OSError):
        ShardChannels([mute.getsockname()[:2]], KEY, connect_timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0
    mute.close()


def test_a_call_that_fails_half_way_closes_the_lines():
    lines = ShardChannels([s.address for s in servers(2)], KEY)
    with pytest.raises(Exception):
        lines.call("forward", (1,), {}, [{}, {"scale": lambda: 0}], 5.0)   # the second request does not pickle
    assert lines.closed                        # shard 0's answer was never read: the lines are out of step


def test_a_job_whose_lines_cannot_open_uses_ray_calls_and_tries_again_later(ray_local, monkeypatch):
    """A real Ray group; the coordinator's connect is made to fail (a port filtered between nodes)."""
    import service.shard_group as sg
    from workers.models import ModelSpec
    from workers.shard import DataSpec

    spec = ModelSpec("softmax", 6, 3)
    group = sg.RayShardGroup(spec, spec.plan(2), "float64", 1, timeout_s=60)
    try:
        group.call("load", DataSpec("synthetic", rows=10, seed=2))
        expected = group.call("forward", 1)                      # on the lines
        assert group._channels is not None and not group._channels.closed
        big = np.zeros(100_000)                                  # 800 KB: sent on the line, not put
        assert group.put(big) is big
        group._close_channels()
        assert isinstance(group.put(big), ray_local.ObjectRef)   # no line: into Ray's store once

        def filtered(*_, **__):
            raise TimeoutError("timed out")
        monkeypatch.setattr(sg, "ShardChannels", filtered)
        got = group.call("forward", 2)                           # through Ray
        for (z1, p1, _), (z2, p2, _) in zip(expected, got):
            np.testing.assert_array_equal(z1, z2)
        assert group._channels is None and group._channels_retry_at > time.monotonic() + sg.CHANNEL_RETRY_S - 5
        monkeypatch.undo()
        group._channels_retry_at = 0.0                           # the retry time has come
        group.call("forward", 3)
        assert group._channels is not None and not group._channels.closed
    finally:
        group.close()


def test_a_call_that_outlives_the_timeout_is_a_timeout_if_the_shards_live_and_the_lines_reopen(ray_local):
    """A real Ray group whose forward takes seconds (2 x 4096 x 2000 x 6000 flops a shard), against a 0.2 s timeout."""
    import service.shard_group as sg
    from service.errors import ShardTimeout
    from workers.models import ModelSpec
    from workers.shard import DataSpec

    spec = ModelSpec("mlp", 2000, 3, 12_000)
    group = sg.RayShardGroup(spec, spec.plan(2), "float32", 1, timeout_s=60)
    try:
        group.call("load", DataSpec("synthetic", rows=4096, seed=2))
        group.call("get_step")                                   # lines open
        group.timeout_s = 0.2
        with pytest.raises(ShardTimeout, match="did not finish forward within 0.2 s"):
            group.call("forward", 1)
        assert group._channels.closed                            # a late answer must not be read as the next
        group.timeout_s = 60
        assert group.call("get_step") == [0, 0]                  # reopened, once the late forward is done
        assert not group._channels.closed
    finally:
        group.close()
