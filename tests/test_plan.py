"""The sharding plan: slices tile the units and the flat vector exactly."""
import pytest

from workers.models import ModelSpec
from workers.plan import Slice, make_plan


@pytest.mark.parametrize("n_units,n_shards", [(1, 1), (7, 7), (10, 3), (1264, 3), (1000, 7), (5, 2)])
def test_slices_tile_units_and_params(n_units, n_shards):
    plan = make_plan(n_units, n_shards, unit_size=4, tail_size=3)
    sizes = [u.size for u in plan.units]
    assert sum(sizes) == n_units and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)          # the first n % S shards get one more
    params = plan.param_slices()
    assert params[0].begin == 0 and params[-1].end == plan.n_params == n_units * 4 + 3
    assert all(a.end == b.begin for a, b in zip(params, params[1:]))
    assert params[-1].size == plan.units[-1].size * 4 + 3  # the output bias lives in the last shard


def test_shard_of_finds_the_owner():
    plan = make_plan(10, 3, unit_size=2, tail_size=1)    # units 4, 3, 3 -> params [0,8) [8,14) [14,21)
    assert [plan.shard_of(i) for i in (0, 7, 8, 13, 14, 20)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"outside \[0, 21\)"):
        plan.shard_of(21)


@pytest.mark.parametrize("n_shards", [0, -1, 11])
def test_shard_count_out_of_range(n_shards):
    with pytest.raises(ValueError, match="shards must be between 1 and 10"):
        make_plan(10, n_shards, 2, 1)


def test_slice_is_a_value():
    s = Slice(2, 5)
    assert s.size == 3 and s.contains(2) and not s.contains(5) and s == Slice(2, 5)
    with pytest.raises(Exception):
        s.begin = 3


@pytest.mark.parametrize("kind,hidden,units,unit_size", [("softmax", 0, 6, 3), ("mlp", 4, 4, 6 + 1 + 3)])
def test_model_units(kind, hidden, units, unit_size):
    spec = ModelSpec(kind, n_features=6, n_outputs=3, n_hidden=hidden)
    assert (spec.n_units, spec.unit_size, spec.n_params) == (units, unit_size, units * unit_size + 3)
