"""The sharding plan: contiguous slices of units and of the flat parameter vector."""
from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    """A half-open range [begin, end) of integers."""

    begin: int
    end: int

    def __post_init__(self) -> None:
        assert 0 <= self.begin <= self.end, f"bad slice [{self.begin}, {self.end})"

    @property
    def size(self) -> int:
        return self.end - self.begin

    def contains(self, i: int) -> bool:
        return self.begin <= i < self.end


@dataclass(frozen=True)
class ShardPlan:
    """Which units and which parameters each shard owns.

    A model is n_units units of unit_size parameters each (a feature's K
    weights, or a hidden neuron's D + 1 + K weights), followed by tail_size
    parameters (the output bias) that belong to the last shard. The flat vector
    is unit-major, so every shard owns one contiguous range of it.
    """

    n_units: int
    unit_size: int
    tail_size: int
    units: tuple[Slice, ...]

    def __post_init__(self) -> None:
        # The unit slices must tile [0, n_units) exactly, each non-empty.
        assert self.units[0].begin == 0 and self.units[-1].end == self.n_units
        for left, right in zip(self.units, self.units[1:]):
            assert left.end == right.begin, f"{left} and {right} do not touch"
        assert all(u.size > 0 for u in self.units)

    @property
    def n_shards(self) -> int:
        return len(self.units)

    @property
    def n_params(self) -> int:
        return self.n_units * self.unit_size + self.tail_size

    def is_last(self, shard: int) -> bool:
        return shard == self.n_shards - 1

    def params(self, shard: int) -> Slice:
        """The shard's range of the flat parameter vector."""
        u = self.units[shard]
        tail = self.tail_size if self.is_last(shard) else 0
        return Slice(u.begin * self.unit_size, u.end * self.unit_size + tail)

    def param_slices(self) -> tuple[Slice, ...]:
        return tuple(self.params(s) for s in range(self.n_shards))

    def shard_of(self, index: int) -> int:
        """The shard that owns flat parameter `index`."""
        if not 0 <= index < self.n_params:
            raise ValueError(f"parameter index {index} is outside [0, {self.n_params})")
        ends = [self.params(s).end for s in range(self.n_shards)]
        return bisect.bisect_right(ends, index)


def make_plan(n_units: int, n_shards: int, unit_size: int, tail_size: int) -> ShardPlan:
    """Split n_units into n_shards contiguous slices; the first n_units % n_shards get one more."""
    if n_units < 1:
        raise ValueError(f"a model needs at least 1 unit, got {n_units}")
    if not 1 <= n_shards <= n_units:
        raise ValueError(f"shards must be between 1 and {n_units} (the number of units), got {n_shards}")
    q, r = divmod(n_units, n_shards)
    bounds = [0]
    for s in range(n_shards):
        bounds.append(bounds[-1] + q + (1 if s < r else 0))
    units = tuple(Slice(a, b) for a, b in zip(bounds, bounds[1:]))
    return ShardPlan(n_units, unit_size, tail_size, units)
