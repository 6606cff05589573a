"""The Ray actor around a Shard: sets its BLAS threads and reports its node."""
from __future__ import annotations

import os

import ray
from threadpoolctl import threadpool_limits

from workers.shard import Shard


class ShardActor(Shard):
    """A Shard in its own process; BLAS threads match the CPUs the job gives it."""

    def __init__(self, *args, blas_threads: int = 1, **kwargs) -> None:
        # Ray's default of one thread per actor wastes cores when a shard has more;
        # more threads than CPUs makes shards on one node fight each other.
        self._thread_limits = threadpool_limits(limits=blas_threads)
        super().__init__(*args, **kwargs)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()


RemoteShard = ray.remote(ShardActor)
