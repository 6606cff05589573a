"""The shards of one job, called together: on Ray actors, or in process for tests."""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from service.errors import ResourceExhausted, ShardTimeout, ShardUnavailable, Unavailable
from workers.channel import CALLS, ChannelLost, ChannelTimeout, RemoteError, ShardChannels
from workers.models import ModelSpec
from workers.optimizers import OptimizerConfig
from workers.plan import ShardPlan
from workers.shard import Shard
from workers.shared import alive, open_shared

log = logging.getLogger(__name__)
INLINE_BYTES = 64 << 10
# Arrays up to this go to each shard on the line rather than once into Ray's store: a
# softmax step with batch 65,536 (2.6 MB dZ) took 28-33 ms so, 38-40 ms through the store;
# batch 8,192 (320 KB), 6.6-6.8 ms against 12.8-14.5 ms.
LINE_BYTES = 4 << 20
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")
BUNDLE_CPU_FLOOR = 0.01       # the bundle of a shard that reserves no CPU (cpus_per_shard = 0)
PLACEMENT_TIMEOUT_S = 30.0
CHANNEL_RETRY_S = 60.0        # Ray calls for this long after the lines to a job's shards failed to open
# While a call on the lines waits longer than this, Ray is asked this often whether the shards'
# nodes are alive: a node that hangs or vanishes sends nothing (no FIN; a hung one even
# answers TCP's keepalives), and the wait would otherwise last the call's whole timeout.
NODE_CHECK_S = 5.0
# Actors started for one dead shard at most: a replacement sent to a node that vanished dies
# with it once Ray declares the node dead, and the next goes to a live node (RayShardGroup._restart).
RESTARTS = 3
# Calls that only copy out a shard's array: lent from its shared memory when it is on this node
# (RayShardGroup.lend).
SHARED_READS = {"get_params": "theta", "get_grad": "grad"}


class ShardGroup(Protocol):
    """Calls one method on every shard and returns the results in shard order."""

    n_shards: int

    def put(self, value: Any) -> Any: ...

    def call(self, method: str, *args: Any, each: Sequence[dict] | None = None, **kwargs: Any) -> list: ...

    def start(self, method: str, *args: Any, each: Sequence[dict] | None = None, **kwargs: Any
              ) -> Callable[[], list]:
        """call() in two halves: the shards start now, and the function returned waits for their
        answers (or raises what call() would have). The caller holds the job's lock until it has
        the answers, or hands the function to whoever holds it next (service.recovery.StepInFlight):
        no other call may reach the shards in between."""
        ...

    def lend(self, method: str) -> list[np.ndarray]:
        """What `call(method)` answers for a method in SHARED_READS, possibly as read-only views
        of the shards' live memory: the caller holds the job's lock and reads them before it
        lets go (copies or encodes them), keeping no view."""
        ...

    def node_ids(self) -> list[str]: ...

    def close(self) -> None: ...


class LocalShardGroup:
    """Shards as plain objects in this process: a fake for coordinator tests without Ray."""

    def __init__(self, spec: ModelSpec, plan: ShardPlan, dtype: str, seed: int,
                 optimizer: OptimizerConfig = OptimizerConfig(), **_: Any) -> None:
        self.shards = [Shard(spec, plan, s, dtype, seed, optimizer) for s in range(plan.n_shards)]
        self.n_shards = plan.n_shards

    def put(self, value: Any) -> Any:
        # Ray hands actors a read-only view of a put array; do the same so that a shard
        # writing into its input fails here too.
        if isinstance(value, np.ndarray):
            value = value.view()
            value.flags.writeable = False
        return value

    def call(self, method: str, *args: Any, each: Sequence[dict] | None = None, **kwargs: Any) -> list:
        return [getattr(shard, method)(*args, **kwargs, **(each[s] if each else {}))
                for s, shard in enumerate(self.shards)]

    def start(self, method: str, *args: Any, each: Sequence[dict] | None = None, **kwargs: Any
              ) -> Callable[[], list]:
        # In process the shards run now; what they raise is raised by finish(), as over the lines.
        try:
            out = self.call(method, *args, each=each, **kwargs)
        except Exception as exc:
            return functools.partial(_reraise, exc)
        return lambda: out

    def lend(self, method: str) -> list[np.ndarray]:
        return self.call(method)

    def node_ids(self) -> list[str]:
        return ["local"] * self.n_shards

    def replace_dead(self, data: Any) -> list[int]:
        return []          # in-process shards do not die

    def close(self) -> None:
        self.shards = []


class RayShardGroup:
    """One Ray actor per shard, placed by a placement group with the job's strategy."""

    def __init__(self, spec: ModelSpec, plan: ShardPlan, dtype: str, seed: int,
                 optimizer: OptimizerConfig = OptimizerConfig(), cpus_per_shard: float = 0.0,
                 timeout_s: float = 600.0, placement: str = "SPREAD",
                 placement_timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from workers.actor import RemoteShard

        if not ray.is_initialized():
            raise Unavailable("the server is still starting Ray; retry when its health service says SERVING")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self._ray = ray
        self.n_shards = plan.n_shards
        self.timeout_s = timeout_s
        total = ray.cluster_resources().get("CPU", 1.0)
        if cpus_per_shard > 0:
            free = ray.available_resources().get("CPU", 0.0)
            if cpus_per_shard * plan.n_shards > free + 1e-9:
                raise ResourceExhausted(
                    f"cpus_per_shard={cpus_per_shard} x shards={plan.n_shards} needs "
                    f"{cpus_per_shard * plan.n_shards:g} CPUs; the cluster has {free:g} free of {total:g}")
            threads = max(1, math.floor(cpus_per_shard))
        else:
            threads = max(1, math.floor(total / plan.n_shards))
        # A bundle cannot be empty: a shard that reserves no CPU still takes a token share.
        bundle = {"CPU": cpus_per_shard or BUNDLE_CPU_FLOOR}
        self._pg = placement_group([bundle] * plan.n_shards, strategy=placement)
        try:
            ray.get(self._pg.ready(), timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self._pg)
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            raise ResourceExhausted(
                f"cannot place {plan.n_shards} shards with placement {placement} (each needs {bundle}) within "
                f"{placement_timeout_s:g} s; the cluster has {nodes} live nodes and {total:g} CPUs") from None
        self._remove_pg = remove_placement_group

        def start(s: int):
            return RemoteShard.options(
                num_cpus=cpus_per_shard,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=s),
            ).remote(spec, plan, s, dtype, seed, optimizer, blas_threads=threads)

        self._start = start
        self._restart_timeout_s = placement_timeout_s
        self.actors = [start(s) for s in range(plan.n_shards)]
        # The direct lines for a step's calls (workers.channel), opened on first use.
        self._authkey = os.urandom(32)
        self._channels: ShardChannels | None = None
        self._shared: list[tuple[int, dict[str, np.ndarray]]] | None = None   # (pid, views) per shard, with the lines
        self._nodes: list[str] = []            # each shard's node when the lines were opened
        self._channels_retry_at = 0.0          # after a failure to open them: Ray calls until then
        self._channel_lock = threading.Lock()
        log.info("started %d shard actors (%s), %d BLAS threads each", plan.n_shards, placement, threads)

    def put(self, value: Any) -> Any:
        # Small arrays travel inside the call itself (Ray inlines arguments under 100 KiB;
        # the line sends arrays up to LINE_BYTES to each shard out of band); a put costs a
        # round trip to the object store (0.6 ms measured here). Larger ones go into the
        # store once, every shard reads the same copy, and the call goes through Ray.
        on_line = self._channels is not None and not self._channels.closed
        if isinstance(value, np.ndarray) and value.nbytes < (LINE_BYTES if on_line else INLINE_BYTES):
            return value
        return self._ray.put(value)

    def call(self, method: str, *args: Any, each: Sequence[dict] | None = None, **kwargs: Any) -> list:
        return self.start(method, *args, each=each, **kwargs)()

    def start(self, method: str, *args: Any, each: Sequence[dict] | None = None, **kwargs: Any
              ) -> Callable[[], list]:
        if method in CALLS and not _holds_refs(self._ray.ObjectRef, args, kwargs, each):
            with self._channel_lock:
                channels = self._open_channels()
                if channels is not None:
                    self._on_channels(channels, method, lambda: channels.start(method, args, kwargs, each))
                    check = self._nodes_alive(method, list(self._nodes))     # the nodes of these very lines
                    return lambda: self._finish_on(channels, method, check)
        refs = [getattr(actor, method).remote(*args, **kwargs, **(each[s] if each else {}))
                for s, actor in enumerate(self.actors)]
        return lambda: self._get(refs, method)

    def lend(self, method: str) -> list[np.ndarray]:
        """Views of the shards' shared memory when it is mapped and every shard's process is
        alive (no message: the caller copies or encodes straight from them); else their
        answers over the lines, or through Ray. A shard whose process is gone is not read:
        its call reports it, as for any call."""
        if method not in SHARED_READS:
            raise ValueError(f"{method} is not a read the shards' shared memory can answer")
        with self._channel_lock:
            if self._open_channels() is not None and self._shared is not None \
                    and all(alive(pid) for pid, _ in self._shared):
                # The caller holds the job's lock: no call is in flight, the shards write nothing.
                return [views[SHARED_READS[method]] for _, views in self._shared]
        return self.call(method)

    def _finish_on(self, channels: ShardChannels, method: str, check: Callable[[], None]) -> list:
        with self._channel_lock:
            return self._on_channels(channels, method,
                                     lambda: channels.finish(method, self.timeout_s, check, NODE_CHECK_S))

    def _nodes_alive(self, method: str, nodes: list[str]) -> Callable[[], None]:
        """A check for a long wait on the lines: ShardUnavailable once Ray has declared a
        shard's node dead (its health checks failed), so that the job is recovered then, not
        after the call's whole timeout. If Ray cannot be asked, the wait goes on; should
        ray.nodes() (a request to the GCS) take long, the wait's deadline is checked again
        after it."""
        def check() -> None:
            try:
                alive_nodes = {n["NodeID"] for n in self._ray.nodes() if n.get("Alive")}
            except Exception as exc:           # noqa: BLE001 - the GCS busy or restarting: keep waiting
                log.debug("cannot ask Ray for its nodes during %s (%s: %s)", method, type(exc).__name__, exc)
                return
            gone = [s for s, node in enumerate(nodes) if node not in alive_nodes]
            if gone:
                raise ShardUnavailable(f"the node of shard {gone[0]} is gone (Ray declared it dead) during {method}; "
                                       "retry the call")
        return check

    def _on_channels(self, channels: ShardChannels, method: str, io: Callable[[], Any]) -> Any:
        """io() (one half of a call on the lines), its failures said as the Ray path says them."""
        try:
            return io()
        except RemoteError as e:
            raise e.cause from None          # the shard's own exception, as on the Ray path
        except ChannelTimeout as e:
            # Slow, or gone with its node (no FIN ever came)? Ray knows: a dead actor
            # makes this raise ShardUnavailable, so the job is recovered, not broken.
            self._get([a.pid.remote() for a in self.actors], "pid")
            raise ShardTimeout(str(e)) from None
        except ChannelLost as e:
            raise ShardUnavailable(f"a shard died during {method}: {e}; retry the call") from None

    def _open_channels(self) -> ShardChannels | None:
        """The lines to the shards, opened if need be; None (use Ray calls) if they cannot be.

        After a failure to open them, calls go through Ray for CHANNEL_RETRY_S, then the
        lines are tried again; a replaced shard makes them be tried at once.
        """
        if self._channels is not None and not self._channels.closed:
            return self._channels
        if time.monotonic() < self._channels_retry_at:
            return None
        channels = None
        try:
            addresses = self._get([a.open_channel.remote(self._authkey) for a in self.actors], "open_channel")
            channels = ShardChannels(addresses, self._authkey)
            answers = self._get([a.shared_arrays.remote() for a in self.actors], "shared_arrays")
            # all three together, or none: lines whose nodes are not known would be checked against stale ones
            shared = self._map_shared(answers)
            self._channels, self._nodes, self._shared = channels, [node for node, _ in answers], shared
        except ShardUnavailable:
            if channels is not None:
                channels.close()
            raise                              # a dead shard: recovery, as on the Ray path
        except Exception as exc:               # cannot bind, refused, filtered (timed out), handshake failed
            if channels is not None:
                channels.close()
            log.warning("cannot open the lines to the shards (%s: %s); Ray calls for %g s", type(exc).__name__,
                        exc, CHANNEL_RETRY_S)
            self._channels_retry_at = time.monotonic() + CHANNEL_RETRY_S
            return None
        return self._channels

    def _map_shared(self, answers: list[tuple[str, dict]]) -> list[tuple[int, dict[str, np.ndarray]]] | None:
        """Read-only views of every shard's parameters and kept gradient (the shards' answers to
        shared_arrays) if all run on this node and this process may open them (workers.shared);
        else None: ask over the lines."""
        here = self._ray.get_runtime_context().get_node_id()
        mapped = []
        try:
            for node, arrays in answers:
                if node != here or set(arrays) != set(SHARED_READS.values()):
                    return None
                mapped.append((arrays["theta"].pid, {name: open_shared(w) for name, w in arrays.items()}))
        except OSError as exc:
            log.info("cannot map the shards' memory (%s); their slices come over the lines", exc)
            return None
        return mapped

    def node_ids(self) -> list[str]:
        return self._get([a.node_id.remote() for a in self.actors], "node_id")

    def replace_dead(self, data: Any) -> list[int]:
        """Start a new actor (with its data) for every shard that does not answer; their indices.

        The new actor has the initial parameters: the caller restores a checkpoint.
        """
        ray = self._ray
        # Every shard is asked at once: those that cannot answer (a node that vanished, one that
        # hangs) cost one restart timeout together, not one each.
        asked = [actor.get_step.remote() for actor in self.actors]
        answered = set(ray.wait(asked, num_returns=len(asked), timeout=self._restart_timeout_s)[0])

        def alive(ref) -> bool:
            try:
                ray.get(ref)
                return True
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                return False
        dead = [s for s, ref in enumerate(asked) if ref not in answered or not alive(ref)]
        if dead:
            self._close_channels()
            self._channels_retry_at = 0.0
        for s in dead:
            self._restart(s, data)
        return dead

    def _restart(self, s: int, data: Any) -> None:
        """A new actor for shard s, its data loaded, within the restart timeout.

        A replacement that dies while it starts, for a reason not its own (its creation did
        not raise), is started again, at most RESTARTS times in all and within the timeout: a
        node that vanished (no network) is declared dead by Ray only after its health checks
        (about a minute by default), later than the lines notice (TCP_USER_TIMEOUT, 30 s), so
        the first replacement may be sent to the bundle of the placement group on that node
        and die with it. Ray then moves the bundle to a live node, where the next one starts.
        """
        ray = self._ray
        deadline = time.monotonic() + self._restart_timeout_s
        for attempt in range(1, RESTARTS + 1):
            ray.kill(self.actors[s])
            self.actors[s] = self._start(s)
            try:
                ray.get(self.actors[s].load.remote(data), timeout=max(0.0, deadline - time.monotonic()))
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                # A timeout, or a creation that raised, would only happen again.
                if getattr(exc, "actor_init_failed", True) or time.monotonic() >= deadline:
                    raise ShardUnavailable(f"shard {s} died and could not be restarted within "
                                           f"{self._restart_timeout_s:g} s ({type(exc).__name__})") from None
                if attempt == RESTARTS:
                    raise ShardUnavailable(f"shard {s} died and could not be restarted: {RESTARTS} replacements "
                                           f"died while starting ({type(exc).__name__})") from None
                log.warning("the replacement of shard %d died while starting (its node lost?); starting another",
                            s)

    def _close_channels(self) -> None:
        with self._channel_lock:
            if self._channels is not None:
                self._channels.close()
                self._channels = None
            self._shared = None
            self._nodes = []

    def close(self) -> None:
        self._close_channels()
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            self._remove_pg(self._pg)
            self._pg = None

    def _get(self, refs: list, method: str) -> list:
        exc = self._ray.exceptions
        try:
            return self._ray.get(refs, timeout=self.timeout_s)
        except exc.RayTaskError as e:
            # The shard raised: surface its own exception (ValueError etc.), not Ray's wrapper.
            cause = getattr(e, "cause", None)
            if cause is not None:
                raise cause from None
            raise
        except exc.GetTimeoutError:
            raise ShardTimeout(f"shards did not finish {method} within {self.timeout_s:g} s") from None
        except (exc.RayActorError, exc.ObjectLostError) as e:
            raise ShardUnavailable(f"a shard died during {method}: {type(e).__name__}; retry the call") from None


def _reraise(exc: Exception) -> list:
    raise exc


def _holds_refs(ref_type: type, args: tuple, kwargs: dict, each: Sequence[dict] | None) -> bool:
    """Whether a call passes Ray object refs (large arrays put once): those go through Ray."""
    values = [*args, *kwargs.values(), *(v for d in each or () for v in d.values())]
    return any(isinstance(v, ref_type) for v in values)
