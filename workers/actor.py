"""The Ray actor around a Shard: sets its BLAS threads, reports its node, serves the
step's calls on a direct line (workers.channel) as well as through Ray, and keeps its
parameters and gradient in memory a coordinator on its node can read (workers.shared)."""
from __future__ import annotations

import inspect
import os
import threading

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from workers.channel import ChannelServer, locked
from workers.memory import keep_freed_memory
from workers.shard import Shard
from workers.shared import SharedArray, shared_copy


class ShardActor(Shard):
    """A Shard in its own process; BLAS threads match the CPUs the job gives it."""

    def __init__(self, *args, blas_threads: int = 1, **kwargs) -> None:
        # Ray's default of one thread per actor wastes cores when a shard has more;
        # more threads than CPUs makes shards on one node fight each other.
        self._thread_limits = threadpool_limits(limits=blas_threads)
        keep_freed_memory()                  # the next step reuses this step's pages (workers.memory)
        self._lock = threading.RLock()       # Ray's thread and the channel's take turns (re-entrant: methods call methods)
        self._channel: ChannelServer | None = None
        self._shared: dict[str, SharedArray] = {}
        super().__init__(*args, **kwargs)

    def _kept(self, name: str, a: np.ndarray) -> np.ndarray:
        out, where = shared_copy(a)
        if where is not None:
            self._shared[name] = where
        return out

    def shared_arrays(self) -> tuple[str, dict[str, SharedArray]]:
        """This shard's node, and where a coordinator on it finds theta and the kept gradient."""
        return ray.get_runtime_context().get_node_id(), dict(self._shared)

    def open_channel(self, authkey: bytes) -> tuple[str, int]:
        """Start (once) the line the coordinator uses for a step's calls; its address."""
        if self._channel is None:
            self._channel = ChannelServer(self, ray.util.get_node_ip_address(), authkey)
        return self._channel.address

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()


# Every Shard method, whichever thread calls it, runs under the shard's lock.
for _name, _method in inspect.getmembers(Shard, inspect.isfunction):
    if not _name.startswith("_"):
        setattr(ShardActor, _name, locked(_method))

RemoteShard = ray.remote(ShardActor)
