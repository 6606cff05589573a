"""The sharded gradient against an independent numpy reference and finite differences.

These run the real coordinator over in-process shards (LocalShardGroup, no Ray):
they test the math and the step protocol; test_api.py runs the same over Ray and gRPC.
"""
import numpy as np
import pytest

import reference as ref
from service.coordinator import Coordinator
from service.jobs import JobConfig
from service.shard_group import LocalShardGroup
from workers.data import batch_rows, synthetic_inputs
from workers.plan import Slice
from workers.shard import DataSpec

D, ROWS, DATA_SEED = 9, 31, 5
MODELS = [  # (model, hidden, activation, outputs)
    ("linear", 0, "relu", 2), ("logistic", 0, "relu", 1), ("softmax", 0, "relu", 4),
    ("mlp", 10, "relu", 3), ("mlp", 10, "tanh", 3)]
MODEL_IDS = [f"{m}-{a}" if m == "mlp" else m for m, _, a, _ in MODELS]


@pytest.fixture(scope="module")
def coordinator():
    c = Coordinator(LocalShardGroup)
    yield c
    c.close()


def make_job(c, model, hidden, act, K, shards, dtype="float64", seed=3, l2=0.0, batch_size=0, lr=0.1):
    cfg = JobConfig(model, DataSpec("synthetic", rows=ROWS, seed=DATA_SEED), features=D, outputs=K, hidden=hidden,
                    activation=act, shards=shards, dtype=dtype, seed=seed, l2=l2, batch_size=batch_size,
                    learning_rate=lr)
    job = c.create_job(cfg)
    X = synthetic_inputs(DATA_SEED, ROWS, Slice(0, D), np.dtype(dtype))   # the same X, drawn independently here
    return job, X


def reference_grad(job, X, y, theta, l2=0.0):
    named = job.spec.to_named(theta)
    loss, grads = ref.loss_and_grads(job.spec.kind, named, X, y, activation=job.spec.activation, l2=l2)
    return loss, job.spec.from_named(grads, np.float64)


def assert_rel_close(actual, expected, rel):
    """Norm-wise relative error: max |a - e| <= rel * max |e|."""
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(actual - expected)) <= rel * scale, np.max(np.abs(actual - expected)) / scale


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
@pytest.mark.parametrize("model,hidden,act,K", MODELS, ids=MODEL_IDS)
def test_gradient_equals_reference_and_finite_differences(coordinator, model, hidden, act, K, shards):
    l2 = 0.05
    job, X = make_job(coordinator, model, hidden, act, K, shards, l2=l2)
    g = coordinator.gradient(job.job_id)
    theta = coordinator.get_params(job.job_id)
    loss, expected = reference_grad(job, X, job.y, theta, l2)
    assert g.loss == pytest.approx(loss, rel=1e-12)
    assert_rel_close(g.grad, expected, 1e-10)
    assert g.grad_norm == pytest.approx(np.linalg.norm(expected), rel=1e-10)
    # Central differences of the reference loss, every coordinate, from the flat vector.
    named = job.spec.to_named(theta)
    entries = [job.spec.locate(i) for i in range(job.spec.n_params)]
    numeric = ref.numeric_grads(model, named, X, job.y, entries, h=1e-6, activation=act, l2=l2)
    np.testing.assert_allclose(g.grad, numeric, rtol=1e-5, atol=1e-8)
    coordinator.delete_job(job.job_id)


@pytest.mark.parametrize("model,hidden,act,K", MODELS, ids=MODEL_IDS)
def test_shard_local_finite_differences_check_every_coordinate(coordinator, model, hidden, act, K):
    job, X = make_job(coordinator, model, hidden, act, K, shards=3, l2=0.05)
    result = coordinator.check_gradient(job.job_id, indices=np.arange(job.spec.n_params))
    assert sum(len(s.indices) for s in result.shards) == job.spec.n_params
    theta = coordinator.get_params(job.job_id)
    _, expected = reference_grad(job, X, job.y, theta, 0.05)
    for s in result.shards:
        np.testing.assert_allclose(s.analytic, expected[s.indices], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(s.numeric, expected[s.indices], rtol=1e-5, atol=1e-8)
    coordinator.delete_job(job.job_id)


def test_a_wrong_derivative_is_caught_by_the_check(coordinator, monkeypatch):
    """The check can fail: break the MLP's backward and it reports large errors."""
    from workers import shard_math

    job, _ = make_job(coordinator, "mlp", 10, "tanh", 3, shards=2)
    original = shard_math.MLPShardMath.backward

    def broken(self, theta, X, dZ, cache, out):
        original(self, theta, X, dZ, cache, out)
        out[: self.n_body] *= 1.01
        return out

    monkeypatch.setattr(shard_math.MLPShardMath, "backward", broken)
    result = coordinator.check_gradient(job.job_id, coords_per_shard=40)
    assert max(s.rel_error.max() for s in result.shards) > 5e-3
    coordinator.delete_job(job.job_id)


@pytest.mark.parametrize("model,hidden,act,K", MODELS, ids=MODEL_IDS)
def test_shard_count_changes_only_rounding_and_seed_gives_bitwise_repeats(coordinator, model, hidden, act, K):
    grads = {}
    for shards in (1, 3, 7, 3):
        job, _ = make_job(coordinator, model, hidden, act, K, shards)
        grads.setdefault(shards, []).append(coordinator.gradient(job.job_id).grad)
        coordinator.delete_job(job.job_id)
    np.testing.assert_array_equal(grads[3][0], grads[3][1])
    assert_rel_close(grads[7][0], grads[1][0], 1e-13)


def test_gradient_on_explicit_rows_with_repeats(coordinator):
    job, X = make_job(coordinator, "softmax", 0, "relu", 4, shards=3)
    rows = np.array([0, 5, 5, 30, 7])
    g = coordinator.gradient(job.job_id, rows=rows)
    loss, expected = reference_grad(job, X[rows], job.y[rows], coordinator.get_params(job.job_id))
    assert g.rows == 5 and g.loss == pytest.approx(loss, rel=1e-12)
    assert_rel_close(g.grad, expected, 1e-10)


def test_gradient_at_client_parameters_leaves_the_job_unchanged(coordinator):
    job, X = make_job(coordinator, "mlp", 10, "relu", 3, shards=2)
    before = coordinator.get_params(job.job_id)
    params = ref.init_params("mlp", D, 3, H=10, rng=np.random.default_rng(11))
    g = coordinator.gradient(job.job_id, params=params)
    loss, grads = ref.loss_and_grads("mlp", params, X, job.y)
    assert g.loss == pytest.approx(loss, rel=1e-12)
    assert_rel_close(g.grad, job.spec.from_named(grads, np.float64), 1e-10)
    np.testing.assert_array_equal(coordinator.get_params(job.job_id), before)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("model,hidden,act,K", [MODELS[1], MODELS[3]], ids=["logistic", "mlp-relu"])
def test_sgd_steps_equal_plain_numpy_steps(coordinator, model, hidden, act, K, shards):
    lr, steps, batch = 0.3, 9, 8      # 31 rows -> batches 8, 8, 8, 7 per epoch
    job, X = make_job(coordinator, model, hidden, act, K, shards, batch_size=batch, lr=lr, l2=0.01)
    theta = coordinator.get_params(job.job_id)
    reports = list(coordinator.step(job.job_id, steps))
    for k in range(steps):
        rows, epoch = batch_rows(3, ROWS, batch, k)
        loss, grad = reference_grad(job, X[rows], job.y[rows], theta, 0.01)
        assert reports[k].loss == pytest.approx(loss, rel=1e-12) and reports[k].epoch == epoch
        assert reports[k].grad_norm == pytest.approx(np.linalg.norm(grad), rel=1e-10)
        theta = theta - lr * grad
    assert [r.batch_rows for r in reports] == [8, 8, 8, 7, 8, 8, 8, 7, 8]
    assert_rel_close(coordinator.get_params(job.job_id), theta, 1e-12)
    assert job.step == steps


def test_step_moves_batch_times_outputs_bytes_not_parameters(coordinator):
    job, _ = make_job(coordinator, "softmax", 0, "relu", 4, shards=3, batch_size=8)
    r = next(iter(coordinator.step(job.job_id, 1)))
    # to each shard: 8 row indices (int64) and dZ (8 x 4 float64); from each: Z_s (8 x 4) and four 8-byte scalars
    # (penalty and seconds from forward, squared norm and seconds from backward)
    assert r.bytes_to_shards == 3 * (8 * 8 + 8 * 4 * 8)
    assert r.bytes_from_shards == 3 * (8 * 4 * 8 + 16) + 3 * 16
    assert len(r.shard_seconds) == 3 and all(s > 0 for s in r.shard_seconds)


@pytest.mark.parametrize("model,hidden,act,K", [MODELS[1], MODELS[2], MODELS[4]], ids=["logistic", "softmax", "mlp"])
def test_evaluate_matches_reference_loss_and_accuracy(coordinator, model, hidden, act, K):
    job, X = make_job(coordinator, model, hidden, act, K, shards=2)
    e = coordinator.evaluate(job.job_id)
    loss, acc, rows, step = e.loss, e.accuracy, e.rows, e.step
    named = job.spec.to_named(coordinator.get_params(job.job_id))
    Z = ref.predict(model, named, X, activation=act)
    expected = np.mean((Z[:, 0] > 0) == job.y) if model == "logistic" else np.mean(Z.argmax(1) == job.y)
    assert loss == pytest.approx(ref.loss(model, named, X, job.y, activation=act), rel=1e-12)
    assert acc == pytest.approx(expected) and rows == ROWS and step == 0


def test_float32_job_is_close_to_the_float64_reference(coordinator):
    job, X = make_job(coordinator, "mlp", 10, "relu", 3, shards=3, dtype="float32")
    g = coordinator.gradient(job.job_id)
    assert g.grad.dtype == np.float32
    theta = coordinator.get_params(job.job_id).astype(np.float64)
    _, expected = reference_grad(job, X.astype(np.float64), job.y, theta)
    assert_rel_close(g.grad, expected, 1e-5)
