"""End to end: a real gRPC server on port 0 over a real local Ray, called through the client."""
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import reference as ref
from workers.data import batch_rows


def write_npz(path, X, y):
    np.savez(path, X=X, y=y)
    return str(path)


@pytest.fixture(scope="module")
def big_mlp(client, tmp_path_factory):
    """An MLP 784 -> 1264 -> 10 (1,004,890 float32 parameters), 3 uneven shards, data from an .npz."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((128, 784)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    path = write_npz(tmp_path_factory.mktemp("data") / "mnist_like.npz", X, y)
    job = client.create_job("mlp", hidden=1264, shards=3, npz_path=path, seed=1)
    yield job, X, y
    client.delete_job(job.job_id)


def test_million_parameter_gradient_over_grpc_matches_reference(client, big_mlp):
    job, X, y = big_mlp
    assert job.n_params == 1_004_890 >= 1_000_000
    assert [s.unit_end - s.unit_begin for s in job.shards] == [422, 421, 421]   # uneven split
    params = client.get_params(job.job_id)
    assert {k: v.shape for k, v in params.items()} == {"W1": (784, 1264), "b1": (1264,), "W2": (1264, 10),
                                                      "b2": (10,)}
    summary, grads = client.gradient(job.job_id)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    loss, expected = ref.loss_and_grads("mlp", p64, X.astype(np.float64), y)
    assert summary.loss == pytest.approx(loss, rel=1e-5)
    for name, g in expected.items():
        assert grads[name].dtype == np.float32
        assert np.max(np.abs(grads[name] - g)) <= 1e-4 * np.max(np.abs(g)), name
    assert len(summary.shard_seconds) == 3


def test_million_parameter_flat_view_and_finite_differences(client, big_mlp):
    job, _, _ = big_mlp
    named = client.get_params(job.job_id)
    flat = client.get_params(job.job_id, flat=True)["flat"]
    assert flat.shape == (job.n_params,)
    s = job.shards[1]
    # Shard 1 owns units [422, 843): their rows [W1[:, j], b1[j], W2[j, :]] in order.
    j = s.unit_begin
    unit = flat[s.param_begin: s.param_begin + 784 + 1 + 10]
    np.testing.assert_array_equal(unit, np.concatenate([named["W1"][:, j], [named["b1"][j]], named["W2"][j]]))
    np.testing.assert_array_equal(flat[-10:], named["b2"])
    check = client.check_gradient(job.job_id, coords_per_shard=300, seed=2)
    assert check.checked == 900 and len(check.shards) == 3
    assert check.max_abs_error < 1e-7
    worst = check.shards[0].worst[0]
    assert worst.tensor in ("W1", "b1", "W2") and abs(worst.analytic - worst.numeric) == pytest.approx(
        worst.abs_error)


def test_uneven_float64_split_over_ray_matches_reference(client, tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((40, 10)), rng.integers(0, 3, 40)
    job = client.create_job("softmax", shards=3, dtype="float64", npz_path=write_npz(tmp_path / "d.npz", X, y))
    assert [s.unit_end - s.unit_begin for s in job.shards] == [4, 3, 3]
    summary, grads = client.gradient(job.job_id)
    loss, expected = ref.loss_and_grads("softmax", client.get_params(job.job_id), X, y)
    assert summary.loss == pytest.approx(loss, rel=1e-12)
    for name in expected:
        assert np.max(np.abs(grads[name] - expected[name])) <= 1e-10 * np.max(np.abs(expected[name]))
    client.delete_job(job.job_id)


@pytest.mark.parametrize("shards", [1, 3])
def test_sgd_steps_through_the_api_equal_numpy(client, tmp_path, shards):
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((50, 6)), rng.integers(0, 4, 50)
    job = client.create_job("mlp", hidden=7, activation="tanh", shards=shards, dtype="float64", seed=4,
                            batch_size=16, learning_rate=0.2, npz_path=write_npz(tmp_path / "d.npz", X, y))
    params = client.get_params(job.job_id)
    reports = list(client.step(job.job_id, steps=6))
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    for k, report in enumerate(reports):
        rows, epoch = batch_rows(4, 50, 16, k)
        loss, grads = ref.loss_and_grads("mlp", params, X[rows], y[rows], activation="tanh")
        assert report.loss == pytest.approx(loss, rel=1e-12) and report.epoch == epoch
        params = {k2: params[k2] - 0.2 * grads[k2] for k2 in params}
    after = client.get_params(job.job_id)
    for name in params:
        np.testing.assert_allclose(after[name], params[name], rtol=1e-11, atol=1e-13)
    assert client.get_job(job.job_id).step == 6
    client.delete_job(job.job_id)


def test_set_parameters_then_gradient_and_gradient_at_given_parameters(client, tmp_path):
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((30, 5)), rng.standard_normal(30)
    job = client.create_job("linear", shards=2, dtype="float64", npz_path=write_npz(tmp_path / "d.npz", X, y))
    new = {"W": rng.standard_normal((5, 1)), "b": np.array([0.5])}
    assert client.set_params(job.job_id, {"W": new["W"]}).job_id == job.job_id   # a subset keeps the rest
    assert client.get_params(job.job_id)["b"][0] == 0.0
    client.set_params(job.job_id, new)
    got = client.get_params(job.job_id)
    np.testing.assert_array_equal(got["W"], new["W"])
    _, grads = client.gradient(job.job_id)
    _, expected = ref.loss_and_grads("linear", new, X, y)
    np.testing.assert_allclose(grads["W"], expected["W"], rtol=1e-12)
    other = {"W": np.ones((5, 1)), "b": np.zeros(1)}
    summary, grads = client.gradient(job.job_id, params=other, rows=[1, 2, 3], flat=True)
    loss, expected = ref.loss_and_grads("linear", other, X[[1, 2, 3]], y[[1, 2, 3]])
    assert summary.loss == pytest.approx(loss, rel=1e-12) and summary.rows == 3
    np.testing.assert_allclose(grads["flat"], np.concatenate([expected["W"].ravel(), expected["b"]]), rtol=1e-12)
    np.testing.assert_array_equal(client.get_params(job.job_id)["W"], new["W"])   # unchanged by the call
    client.delete_job(job.job_id)


def test_synthetic_job_over_ray_equals_in_process_shards(client):
    from service.coordinator import Coordinator
    from service.jobs import JobConfig
    from service.shard_group import LocalShardGroup
    from workers.shard import DataSpec

    job = client.create_job("logistic", shards=2, dtype="float64", rows=64, features=20, seed=9)
    _, grads = client.gradient(job.job_id, flat=True)
    local = Coordinator(LocalShardGroup)
    twin = local.create_job(JobConfig("logistic", DataSpec("synthetic", rows=64, seed=9), features=20, shards=2,
                                      dtype="float64", seed=9))
    np.testing.assert_allclose(grads["flat"], local.gradient(twin.job_id).grad, rtol=1e-13, atol=1e-16)
    evaluation = client.evaluate(job.job_id)
    assert evaluation.HasField("accuracy") and evaluation.rows == 64
    client.delete_job(job.job_id)
    assert job.job_id not in [j.job_id for j in client.list_jobs()]


def test_get_job_and_list_jobs_describe_the_job(client, big_mlp):
    job, _, _ = big_mlp
    got = client.get_job(job.job_id)
    assert got.n_params == 1_004_890 and got.rows == 128 and got.features == 784 and got.outputs == 10
    assert [t.name for t in got.tensors] == ["W1", "b1", "W2", "b2"]
    assert got.shards[-1].param_end == got.n_params and all(s.node_id for s in got.shards)
    assert job.job_id in [j.job_id for j in client.list_jobs()]


def test_health_says_serving_and_reflection_lists_the_service(server):
    channel = grpc.insecure_channel(server[0])
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "gradshard.v1.GradShard"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert {"gradshard.v1.GradShard", "grpc.health.v1.Health"} <= names
    channel.close()


def test_create_server_starts_not_serving_until_told(ray_local):
    """The building block of serve(); test_cli checks the real start-up order."""
    from service.coordinator import Coordinator
    from service.server import create_server, set_serving

    srv, port, health_servicer = create_server(Coordinator(), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    set_serving(health_servicer)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    srv.stop(0)
