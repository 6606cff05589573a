"""A direct line from the coordinator to each shard for the small calls of a step.

A Ray actor call costs 2.3 ms per step for two actors doing nothing on this 2-core
machine (2.9–3.2 ms around 6 ms of compute); the same call as a message on a socket
costs 0.2 ms (0.6 ms around compute), measured with the same actors in
one script. A step's calls carry O(batch x outputs) numbers, so they go on the line, and so do
the calls that read or write a slice; Ray still places, starts, restarts and kills
the shards, loads their data, and carries what was put in its object store.

The line is `multiprocessing.connection` (stdlib): length-prefixed frames over TCP, each a
byte of kind and a pickle (the raw bytes of large arrays follow it), with an HMAC challenge
both ways on a random key per job that the coordinator hands each shard through Ray. The
key is the security boundary: anyone may open a TCP connection, but only a holder of the
key gets past the handshake, and a peer past it sends pickles, which could run code in the
shard. CALLS keeps the line to the step's methods; it is not a second boundary. The bytes
are not encrypted (nor is Ray's own traffic between nodes without TLS): keep the nodes on a
private network.
Large arrays travel out of band (pickle protocol 5): written from their own memory and
read straight into the receiver's, not copied through pickle bytes.
stdlib and numpy: no Ray, no gRPC.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import queue
import select
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# The calls of a step, and those that move a slice (a pickle on a socket beats Ray's
# object store here: get_params of 2 x 2 MB took 9.6 ms through Ray).
CALLS = frozenset({"forward", "backward", "apply", "backward_apply",
                   "get_params", "get_grad", "set_params", "get_step", "state", "restore"})


class RemoteError(Exception):
    """A shard raised: `cause` is its exception."""

    def __init__(self, shard: int, cause: BaseException) -> None:
        super().__init__(f"shard {shard}: {type(cause).__name__}: {cause}")
        self.shard, self.cause = shard, cause


MAX_HANDSHAKES = 8            # connections being authenticated at once; more are closed at once


class ChannelServer:
    """Serves CALLS on `target` to one authenticated connection at a time.

    Each new connection is authenticated on a thread of its own, so a peer that
    connects and says nothing (or says it slowly) holds nothing up; authenticated
    connections queue for the serving thread, which takes the next when the current
    one closes (a coordinator reconnecting after a timeout waits for the late call).
    """

    def __init__(self, target: Any, host: str, authkey: bytes, handshake_timeout_s: float = 5.0) -> None:
        self.target = target
        self._authkey, self._handshake_timeout_s = authkey, handshake_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, 0), family=family)
        self.address: tuple[str, int] = self._socket.getsockname()[:2]
        self._sessions: queue.Queue[Connection] = queue.Queue()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        threading.Thread(target=self._accept, name="shard-channel-accept", daemon=True).start()
        threading.Thread(target=self._serve, name="shard-channel", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._socket.accept()
            except OSError as exc:                 # e.g. out of descriptors: wait, go on listening
                log.warning("shard channel: accept failed: %s", exc)
                time.sleep(0.1)
                continue
            if not self._handshakes.acquire(blocking=False):
                sock.close()
                continue
            threading.Thread(target=self._authenticate, args=(sock, peer), daemon=True).start()

    def _authenticate(self, sock: socket.socket, peer: Any) -> None:
        try:
            _tune(sock, read_timeout_s=self._handshake_timeout_s)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
                _read_timeout(conn, 0)
            except Exception as exc:               # a wrong key, silence, or a peer that went away
                log.warning("shard channel refused a connection from %s: %s", peer, exc)
                conn.close()
                return
            self._sessions.put(conn)
        finally:
            self._handshakes.release()

    def _serve(self) -> None:
        while True:
            conn = self._sessions.get()
            with conn:
                try:
                    self._serve_connection(conn)
                except Exception as exc:           # a message that does not unpickle, memory...
                    log.warning("shard channel: dropped the connection: %s: %s", type(exc).__name__, exc)

    def _serve_connection(self, conn: Connection) -> None:
        while True:
            try:
                method, args, kwargs = receive(conn)
            except (EOFError, OSError):
                return                          # the coordinator closed it; wait for the next
            try:
                if method not in CALLS:
                    raise ValueError(f"{method!r} is not a channel call")
                reply = ("ok", getattr(self.target, method)(*args, **kwargs))
            except Exception as exc:
                reply = ("error", exc)
            try:
                _send(conn, reply)
            except OSError:
                return


# A peer whose node is gone sends no FIN: keepalive probes and a bound on unacknowledged
# data turn that silence into an error within about 30 s, as Ray notices a dead node.
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
USER_TIMEOUT_MS = 30_000


def _tune(sock: socket.socket, read_timeout_s: float = 0.0) -> None:
    """Options of a line's socket, set before Connection takes its descriptor.

    No Nagle: a message is a header write then its buffers' writes, and Nagle's
    algorithm would hold those back until the peer's (delayed) acknowledgement; that
    halved the calls per second of bench/load.py before it was set.
    """
    sock.settimeout(None)                       # blocking: Connection reads the bare descriptor
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    if read_timeout_s:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(read_timeout_s))


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def _read_timeout(conn: Connection, seconds: float) -> None:
    """Reads on the connection fail after `seconds` (0: never). Set through a duplicate of
    its descriptor (socket options belong to the socket, not the descriptor)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def _send(conn: Connection, reply: tuple) -> None:
    try:
        send(conn, reply)
    except OSError:
        raise
    except Exception as exc:                    # an exception that does not pickle
        send(conn, ("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} (unpicklable: {exc})")))


OUT_OF_BAND_BYTES = 64 << 10


def send(conn: Connection, obj: Any) -> None:
    """One message: a frame holding its pickle, then the raw bytes of its large buffers."""
    write_frame(conn, *encode(obj))


PLAIN, WITH_BUFFERS = 0, 1     # a frame's first byte: its pickle is the message / large buffers follow it


def encode(obj: Any) -> tuple[bytes, list[memoryview]]:
    """A message's frame and its large buffers, for write_frame(); encoded once, a message may
    go to every shard. A step's call or answer with no array of OUT_OF_BAND_BYTES is one
    pickle, and one write up to 16 KiB (multiprocessing writes a longer frame's length apart):
    W2's are. A pickle of (head, sizes) around every message, encoded again for each shard,
    made the time from the end of the slowest shard's compute to the next call 0.06-0.08 ms
    longer here."""
    raws: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < OUT_OF_BAND_BYTES:
            return True                         # small: inside the pickle
        raws.append(raw)
        return False

    head = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    if not raws:
        return bytes((PLAIN,)) + head, raws
    return bytes((WITH_BUFFERS,)) + pickle.dumps((head, [r.nbytes for r in raws]), protocol=5), raws


def write_frame(conn: Connection, frame: bytes, raws: list[memoryview]) -> None:
    conn.send_bytes(frame)
    for raw in raws:
        while raw.nbytes:
            raw = raw[os.write(conn.fileno(), raw):]


def receive(conn: Connection) -> Any:
    """The message send() wrote; large buffers are read into fresh (writable) memory.

    EOFError means the line closed; a frame that is not one of send()'s is a ValueError."""
    frame = memoryview(conn.recv_bytes())
    if frame.nbytes < 2 or frame[0] not in (PLAIN, WITH_BUFFERS):
        first = f"first byte {frame[0]:#04x}" if frame.nbytes else "empty"
        raise ValueError(f"not a frame of the line ({first}, {frame.nbytes} bytes)")
    if frame[0] == PLAIN:
        return _loads(frame[1:])
    head, sizes = _loads(frame[1:])
    buffers = [np.empty(n, np.uint8) for n in sizes]
    for buffer in buffers:
        view = memoryview(buffer)
        while view.nbytes:
            got = os.readv(conn.fileno(), [view])
            if got == 0:
                raise EOFError("the line closed in the middle of a message")
            view = view[got:]
    return _loads(head, buffers)


def _loads(data: Any, buffers: list | None = None) -> Any:
    try:
        return pickle.loads(data, buffers=buffers)
    except EOFError as exc:          # a truncated pickle, not a closed line
        raise ValueError(f"a frame that does not unpickle: {exc}") from None


_LONGEST_POLL_S = (2**31 - 1) / 1000     # poll()'s longest wait, 24.8 days


def readable(conn: Connection, timeout_s: float) -> bool:
    """Whether conn has something to read (a frame, or its end) within timeout_s.

    Connection.poll() does the same through multiprocessing's wait(), which builds a selector
    for each call: about 25 Python calls, twice a step on the coordinator's critical path.
    One poll object and one system call cost the coordinator's thread about 0.1 ms less CPU a
    W2 step (bench/RESULTS.md)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    # a longer wait than poll() can express is cut to its longest
    return bool(poller.poll(max(0, math.ceil(min(timeout_s, _LONGEST_POLL_S) * 1000))))


def connect(address: tuple[str, int], authkey: bytes, timeout_s: float) -> Connection:
    """multiprocessing.connection.Client, with a timeout on the TCP connect and the handshake
    (a port closed by a firewall would otherwise hang for minutes)."""
    sock = socket.create_connection(tuple(address), timeout=timeout_s)
    _tune(sock, read_timeout_s=timeout_s)
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        _read_timeout(conn, 0)
    except BaseException:
        conn.close()
        raise
    return conn


class ChannelLost(Exception):
    """A line broke (its shard died or went away); the lines are closed."""


class ChannelTimeout(ChannelLost):
    """A shard did not answer in time; the lines are closed."""


class ShardChannels:
    """The coordinator's ends of the lines to every shard of a job, called together."""

    def __init__(self, addresses: Sequence[tuple[str, int]], authkey: bytes, connect_timeout_s: float = 5.0) -> None:
        self.conns: list[Connection] = []
        try:
            for address in addresses:
                self.conns.append(connect(address, authkey, connect_timeout_s))
        except BaseException:
            self.close()
            raise

    def call(self, method: str, args: tuple, kwargs: dict, each: Sequence[dict] | None, timeout_s: float) -> list:
        """Every shard's result in shard order. RemoteError if a shard raised (every
        answer is read first, so the lines stay in step); ChannelLost if a line broke."""
        self.start(method, args, kwargs, each)
        return self.finish(method, timeout_s)

    def start(self, method: str, args: tuple, kwargs: dict, each: Sequence[dict] | None) -> None:
        """The first half of call(): the call is sent to every shard; finish() reads the answers.
        Nothing else may go on the lines in between."""
        def write() -> None:
            same = None if each else encode((method, args, kwargs))     # one pickle for every shard
            for s, conn in enumerate(self.conns):
                frame, raws = same if same is not None else encode((method, args, {**kwargs, **each[s]}))
                write_frame(conn, frame, raws)

        self._guarded(method, write)

    def finish(self, method: str, timeout_s: float, check: Callable[[], None] | None = None,
               check_every_s: float = 5.0) -> list:
        """The second half of call(): every shard's answer to the call start() sent, within
        timeout_s of this call (not of start(): what the caller did in between is not the shards').

        While it waits, check() (if given) runs every check_every_s seconds; what it raises
        ends the wait, the lines closed. A shard whose node hangs or vanishes sends nothing,
        not even a FIN, and the caller may know sooner than timeout_s (Ray declares the node dead)."""
        def read() -> list:
            if check is not None and not check_every_s > 0:     # in here, so that the lines are closed
                raise ValueError(f"check_every_s must be > 0, got {check_every_s}")
            deadline = time.monotonic() + timeout_s
            replies = []
            for conn in self.conns:
                while not readable(conn, min(deadline - time.monotonic(), check_every_s if check else math.inf)):
                    if time.monotonic() >= deadline:
                        self.close()         # a late answer would put the line out of step
                        raise ChannelTimeout(f"shards did not finish {method} within {timeout_s:g} s")
                    if check is not None:
                        check()              # then look again: an answer that came meanwhile is taken
                replies.append(receive(conn))
            return replies

        replies = self._guarded(method, read)
        for s, (status, value) in enumerate(replies):
            if status == "error":
                raise RemoteError(s, value)
        return [value for _, value in replies]

    def _guarded(self, method: str, io: Callable[[], Any]) -> Any:
        try:
            return io()
        except (EOFError, OSError) as exc:
            self.close()
            raise ChannelLost(f"{type(exc).__name__} during {method}: {exc}") from None
        except BaseException:
            self.close()                     # half a message sent or read: the lines are out of step
            raise

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []

    @property
    def closed(self) -> bool:
        return not self.conns


def locked(method: Callable, lock_attr: str = "_lock") -> Callable:
    """`method` run under the instance's lock: Ray calls and the channel thread share a shard."""
    def run(self, *args, **kwargs):
        with getattr(self, lock_attr):
            return method(self, *args, **kwargs)
    run.__name__, run.__doc__, run.__wrapped__ = method.__name__, method.__doc__, method
    return run
