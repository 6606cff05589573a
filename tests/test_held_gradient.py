"""GetGradient: the gradient a job's last step applied, as its shards keep it.

Values against the independent numpy reference (tests/reference.py) and against
ComputeGradient at the same parameters and rows; a real server over a real local Ray,
except where a test is about the coordinator's bookkeeping alone (LocalShardGroup).
"""
import grpc
import numpy as np
import pytest

import reference as ref
from processes import wait_until_gone
from service.coordinator import Coordinator
from service.errors import FailedPrecondition
from service.jobs import JobConfig
from service.shard_group import LocalShardGroup
from workers.data import batch_rows
from workers.shard import DataSpec


def write_npz(path, X, y):
    np.savez(path, X=X, y=y)
    return str(path)


def flat_of(grads):
    """The MLP's flat view (proto: unit-major) of named tensors."""
    W1, b1, W2, b2 = grads["W1"], grads["b1"], grads["W2"], grads["b2"]
    units = [np.concatenate([W1[:, j], b1[j:j + 1], W2[j, :]]) for j in range(W1.shape[1])]
    return np.concatenate(units + [b2])


def test_each_step_s_minibatch_gradient_is_served_and_a_client_gradient_does_not_replace_it(client, tmp_path):
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    job = client.create_job("mlp", hidden=5, activation="tanh", shards=2, dtype="float64", seed=2,
                            batch_size=16, learning_rate=0.3, npz_path=write_npz(tmp_path / "d.npz", X, y))
    with pytest.raises(grpc.RpcError) as e:
        client.held_gradient(job.job_id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "run Step" in e.value.details()
    for k in range(3):
        params = client.get_params(job.job_id)
        report = next(iter(client.step(job.job_id, 1)))
        rows, _ = batch_rows(2, 40, 16, k)
        loss, expected = ref.loss_and_grads("mlp", params, X[rows], y[rows], activation="tanh")
        summary, held = client.held_gradient(job.job_id)
        for name in expected:
            np.testing.assert_allclose(held[name], expected[name], rtol=1e-11, atol=1e-14)
        assert (summary.applied_step, summary.step, summary.rows) == (k + 1, k, len(rows))
        assert summary.loss == report.loss == pytest.approx(loss, rel=1e-12)
        assert summary.grad_norm == pytest.approx(np.linalg.norm(flat_of(expected)), rel=1e-12)
        assert summary.clip_scale == 1.0 and list(summary.shard_seconds) == list(report.shard_seconds)
        # the flat view, and the same gradient asked for by a client at those parameters and rows
        _, held_flat = client.held_gradient(job.job_id, flat=True)
        np.testing.assert_allclose(held_flat["flat"], flat_of(expected), rtol=1e-11, atol=1e-14)
        computed_summary, computed = client.gradient(job.job_id, rows=rows, params=params, flat=True)
        assert computed_summary.applied_step == 0 and computed_summary.clip_scale == 0.0   # GetGradient's fields only
        np.testing.assert_array_equal(computed["flat"], held_flat["flat"])
        client.gradient(job.job_id, rows=[0, 1], params={"flat": held_flat["flat"]})    # another point
        _, again = client.held_gradient(job.job_id, flat=True)
        np.testing.assert_array_equal(again["flat"], held_flat["flat"])
    client.delete_job(job.job_id)


def test_a_clipped_step_serves_the_clipped_gradient(client, tmp_path):
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((30, 4)), rng.integers(0, 2, 30).astype(np.float64)
    job = client.create_job("logistic", shards=2, dtype="float64", clip_norm=0.01, learning_rate=0.5,
                            npz_path=write_npz(tmp_path / "d.npz", X, y))
    params = client.get_params(job.job_id)
    report = next(iter(client.step(job.job_id, 1)))
    _, expected = ref.loss_and_grads("logistic", params, X, y)
    summary, held = client.held_gradient(job.job_id)
    assert 0 < report.clip_scale < 1 and summary.clip_scale == report.clip_scale
    for name in expected:
        np.testing.assert_allclose(held[name], report.clip_scale * expected[name], rtol=1e-12)
    assert summary.grad_norm == pytest.approx(0.01, rel=1e-5)
    assert summary.grad_norm / summary.clip_scale == pytest.approx(report.grad_norm, rel=1e-12)
    client.delete_job(job.job_id)


def test_a_float32_gradient_of_several_chunks_equals_compute_gradient_at_the_step_s_parameters(client):
    # 30,000 x 10 + 10 float32 = 1.2 MB: two chunks, the shards' slices meeting inside the first
    job = client.create_job("softmax", shards=2, rows=64, features=30_000, outputs=10, seed=3, learning_rate=1e-3)
    list(client.step(job.job_id, 2))
    _, earlier = client.held_gradient(job.job_id, flat=True)
    assert client.held_gradient(job.job_id)[0].applied_step == 2
    before = client.get_params(job.job_id, flat=True)
    list(client.step(job.job_id, 1))
    summary, held = client.held_gradient(job.job_id, flat=True)
    _, computed = client.gradient(job.job_id, params=before, flat=True)
    assert held["flat"].dtype == np.float32 and held["flat"].shape == (300_010,)
    np.testing.assert_array_equal(held["flat"], computed["flat"])
    assert summary.grad_norm == pytest.approx(float(np.linalg.norm(held["flat"].astype(np.float64))), rel=1e-5)
    assert np.abs(held["flat"] - earlier["flat"]).max() > 1e-3 * np.abs(held["flat"]).max()   # step 3's own
    named = client.held_gradient(job.job_id)[1]
    np.testing.assert_array_equal(np.concatenate([named["W"].ravel(), named["b"]]), held["flat"])
    client.delete_job(job.job_id)


def test_an_unknown_job_is_not_found(client):
    with pytest.raises(grpc.RpcError) as e:
        client.held_gradient("no-such-job")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_refused_step_keeps_the_last_applied_gradient():
    c = Coordinator(LocalShardGroup)
    job = c.create_job(JobConfig(model="linear", data=DataSpec("synthetic", rows=30, seed=1), features=6,
                                 outputs=1, shards=3, dtype="float64"))
    with pytest.raises(FailedPrecondition, match="keeps no step's gradient"):
        c.held_gradient(job.job_id)
    list(c.step(job.job_id, 1, learning_rate=1e200))        # finite, but the parameters are now ~1e200
    first = c.held_gradient(job.job_id)
    with pytest.raises(FailedPrecondition, match="the loss is inf at step 2"):
        list(c.step(job.job_id, 1, learning_rate=1e200))
    kept = c.held_gradient(job.job_id)
    assert kept.applied_step == 1
    np.testing.assert_array_equal(kept.grad, first.grad)


def test_a_restarted_shard_keeps_no_gradient_until_a_step_is_replayed_or_run(client, server, ray_local):
    job = client.create_job("softmax", shards=2, rows=20, features=6, outputs=3, dtype="float64")
    list(client.step(job.job_id, 3))
    _, before = client.held_gradient(job.job_id, flat=True)

    def kill_shard_1():
        actor = server[1].jobs.get(job.job_id).group.actors[1]
        pid = ray_local.get(actor.pid.remote())
        ray_local.kill(actor)
        wait_until_gone(pid)

    kill_shard_1()
    with pytest.raises(grpc.RpcError) as e:
        client.held_gradient(job.job_id)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    summary, after = client.held_gradient(job.job_id, flat=True)     # recovery replayed steps 1-3
    assert summary.applied_step == 3
    np.testing.assert_array_equal(after["flat"], before["flat"])

    client.checkpoint(job.job_id)                                    # now a recovery replays nothing
    kill_shard_1()
    with pytest.raises(grpc.RpcError) as e:
        client.held_gradient(job.job_id)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as e:
        client.held_gradient(job.job_id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    list(client.step(job.job_id, 1))
    assert client.held_gradient(job.job_id)[0].applied_step == 4
    client.delete_job(job.job_id)
