"""Named tensors <-> the unit-major flat view, and where a flat index lives."""
import numpy as np
import pytest

from workers.data import init_theta
from workers.models import ModelSpec
from workers.plan import Slice


@pytest.mark.parametrize("spec", [ModelSpec("softmax", 5, 3), ModelSpec("linear", 4, 2),
                                  ModelSpec("logistic", 6, 1), ModelSpec("mlp", 5, 3, 4, "tanh")])
def test_named_and_flat_views_round_trip_and_locate_agrees(spec):
    flat = np.arange(spec.n_params, dtype=np.float64)
    named = spec.to_named(flat)
    assert {k: v.shape for k, v in named.items()} == spec.tensor_shapes()
    np.testing.assert_array_equal(spec.from_named(named, np.float64), flat)
    for i in range(spec.n_params):       # entry i of the flat view holds the value i
        name, where = spec.locate(i)
        assert named[name][where] == i


def test_mlp_flat_layout_is_one_block_per_hidden_unit():
    spec = ModelSpec("mlp", 2, 2, 3)
    named = spec.to_named(np.arange(spec.n_params, dtype=np.float64))
    # unit j = [W1[0, j], W1[1, j], b1[j], W2[j, 0], W2[j, 1]] at 5 j .. 5 j + 4; b2 at 15, 16
    np.testing.assert_array_equal(named["W1"], [[0, 5, 10], [1, 6, 11]])
    np.testing.assert_array_equal(named["b1"], [2, 7, 12])
    np.testing.assert_array_equal(named["W2"], [[3, 4], [8, 9], [13, 14]])
    np.testing.assert_array_equal(named["b2"], [15, 16])


@pytest.mark.parametrize("spec", [ModelSpec("softmax", 700, 3), ModelSpec("mlp", 5, 3, 600)])
def test_initial_parameters_do_not_depend_on_the_shard_split(spec):
    whole = init_theta(spec, Slice(0, spec.n_units), True, seed=7, dtype=np.float64)
    cuts = [0, 255, 256, 513, spec.n_units]
    parts = [init_theta(spec, Slice(a, b), b == spec.n_units, 7, np.float64) for a, b in zip(cuts, cuts[1:])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert np.all(spec.to_named(whole)["b" if spec.kind != "mlp" else "b1"] == 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="cnn", n_features=2, n_outputs=2), "model must be one of linear, logistic, softmax, mlp"),
    (dict(kind="logistic", n_features=2, n_outputs=3), "logistic has exactly 1 output"),
    (dict(kind="mlp", n_features=2, n_outputs=3, n_hidden=2, activation="gelu"), "activation must be one of"),
])
def test_bad_specs_say_what_is_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**kwargs)
