"""Training through the real server: Train streaming and cancellation, epochs, held-out rows,
uploads, reproducibility, and an MLP on scikit-learn's digits against plain numpy."""
import os

import grpc
import numpy as np
import pytest

import reference as ref
from gradshard.v1 import gradshard_pb2 as pb
from service.client import optimizer, schedule
from workers.data import batch_rows, holdout_split

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_train_streams_events_with_evaluations_and_epochs(client):
    job = client.create_job("softmax", shards=3, rows=50, features=12, outputs=3, batch_size=16, seed=2,
                            holdout_fraction=0.2, optimizer=optimizer("adam"), learning_rate=0.05)
    assert (job.holdout_rows, job.train_rows) == (10, 40)       # 40 training rows -> batches 16, 16, 8
    events = list(client.train(job.job_id, epochs=2, eval_every=4))
    assert [e.report.step for e in events] == list(range(1, 7)) and events[0].total_steps == 6
    assert [e.report.batch_rows for e in events] == [16, 16, 8] * 2
    assert [e.report.epoch for e in events] == [0, 0, 0, 1, 1, 1]
    assert [e.HasField("eval_loss") for e in events] == [False, False, False, True, False, True]
    holdout = client.evaluate(job.job_id, split="holdout")
    assert holdout.rows == 10 and holdout.loss == pytest.approx(events[-1].eval_loss, rel=1e-6)
    assert events[-1].eval_accuracy == pytest.approx(holdout.accuracy)
    assert all(e.examples_per_second > 0 for e in events)
    assert client.get_job(job.job_id).step == 6
    client.delete_job(job.job_id)


def test_a_cancelled_train_leaves_every_shard_at_the_same_step(client):
    job = client.create_job("mlp", hidden=300, shards=3, rows=2000, features=200, outputs=5, batch_size=64, seed=3,
                            optimizer=optimizer("momentum"), learning_rate=0.01)
    stream = client.train(job.job_id, steps=100_000)
    seen = [next(stream).report.step for _ in range(5)]
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED and seen == [1, 2, 3, 4, 5]
    after = client.get_job(job.job_id)
    assert 5 <= after.step < 100_000
    assert [s.step for s in after.shards] == [after.step] * 3
    more = list(client.step(job.job_id, 2))                     # the job trains on from there
    assert [r.step for r in more] == [after.step + 1, after.step + 2]
    client.delete_job(job.job_id)


def final_params(client, shards, seed=5):
    job = client.create_job("logistic", shards=shards, dtype="float64", rows=90, features=10, batch_size=20,
                            seed=seed, optimizer=optimizer("adamw", weight_decay=0.01),
                            schedule=schedule("cosine", total_steps=12, warmup_steps=3), clip_norm=0.5)
    losses = [e.report.loss for e in client.train(job.job_id, steps=12)]
    params = client.get_params(job.job_id, flat=True)["flat"]
    client.delete_job(job.job_id)
    return params, losses


def test_same_seed_is_bitwise_reproducible_and_batches_do_not_depend_on_shards(client):
    a, losses_a = final_params(client, shards=3)
    b, losses_b = final_params(client, shards=3)
    np.testing.assert_array_equal(a, b)
    assert losses_a == losses_b
    one, losses_one = final_params(client, shards=1)
    np.testing.assert_allclose(one, a, rtol=1e-12, atol=1e-15)      # same batches, only summation order differs
    np.testing.assert_allclose(losses_one, losses_a, rtol=1e-12)


def test_bad_train_requests(client):
    job = client.create_job("linear", rows=10, features=3)
    for kwargs, match in [(dict(), "set exactly one of steps or epochs"),
                          (dict(steps=2, epochs=1), "set exactly one of steps or epochs"),
                          (dict(steps=2, eval_every=-1), "eval_every must be >= 0")]:
        with pytest.raises(grpc.RpcError) as e:
            list(client.train(job.job_id, **kwargs))
        assert e.value.code() == INVALID and match in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.evaluate(job.job_id, split="holdout")
    assert e.value.code() == INVALID and "holds no rows out" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.create_job("linear", rows=10, features=3, optimizer=optimizer("adam", beta1=1.5))
    assert e.value.code() == INVALID and "optimizer.beta1 must be in [0, 1), got 1.5" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.create_job("linear", rows=10, features=3, schedule=schedule("cosine"))
    assert e.value.code() == INVALID and "total_steps must be >= 1 for cosine" in e.value.details()
    client.delete_job(job.job_id)


# --- uploads --------------------------------------------------------------------------
def stored_files(server):
    return sorted(os.listdir(server[1].datasets.directory))


def test_an_upload_larger_than_a_chunk_round_trips_exactly(client, server):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((700, 300)), rng.integers(0, 4, 700)     # X is 1.68 MB: two chunks
    d = client.upload_dataset(X, y, name="wide", classes=4)
    assert (d.rows, d.features, d.bytes, d.label_dtype) == (700, 300, X.nbytes + y.nbytes, "int64")
    with np.load(server[1].datasets.get(d.dataset_id).path) as f:
        np.testing.assert_array_equal(f["X"], X)
        np.testing.assert_array_equal(f["y"], y)
    job = client.create_job("softmax", shards=3, dtype="float64", dataset_id=d.dataset_id, outputs=4)
    assert job.data.dataset_id == d.dataset_id and job.features == 300
    summary, grads = client.gradient(job.job_id)
    loss, expected = ref.loss_and_grads("softmax", client.get_params(job.job_id), X, y)
    assert summary.loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(grads["W"], expected["W"], rtol=1e-9, atol=1e-15)
    with pytest.raises(grpc.RpcError) as e:                  # a job still reads it
        client.delete_dataset(d.dataset_id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and job.job_id in e.value.details()
    client.delete_job(job.job_id)
    client.delete_dataset(d.dataset_id)
    assert d.dataset_id not in [x.dataset_id for x in client.list_datasets()]


def raw_upload(client, *chunks, classes=0):
    msgs = [pb.UploadDatasetRequest(name="bad", classes=classes)] + [pb.UploadDatasetRequest(chunk=c) for c in chunks]
    return client.stub.UploadDataset(iter(msgs), timeout=30)


def chunk(name, array, shape=None, offset=0):
    return pb.TensorChunk(name=name, dtype=pb.FLOAT64 if array.dtype == np.float64 else pb.INT64,
                          shape=list(shape or array.shape), offset=offset, data=array.tobytes())


@pytest.mark.parametrize("make,code,match", [
    (lambda c: raw_upload(c, chunk("X", np.zeros((3, 2))), chunk("X", np.zeros(3), shape=(3, 3), offset=48),
                          chunk("y", np.zeros(3))), INVALID, "a chunk says float64 (3, 3), the first said float64 (3, 2)"),
    (lambda c: raw_upload(c, chunk("X", np.zeros((2, 2)), shape=(3, 2)), chunk("y", np.zeros(3))), INVALID,
     "tensor X is incomplete: got 32 of 48 bytes"),
    (lambda c: c.upload_dataset(np.array([[1.0, np.nan]]), np.zeros(1)), INVALID, "X has 1 non-finite values"),
    (lambda c: c.upload_dataset(np.zeros((3, 2)), np.array([0, 1, 5]), classes=3), INVALID,
     "y must hold class labels in [0, 3), got [0, 5]"),
    (lambda c: c.upload_dataset(np.zeros((3, 2)), np.zeros(4)), INVALID, "y must have 3 rows like X"),
    (lambda c: raw_upload(c, chunk("X", np.zeros((3, 2)))), INVALID, "an upload needs X and y; missing y"),
    (lambda c: raw_upload(c, chunk("X", np.zeros(4), shape=(1 << 20, 1 << 20))), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "exceeds the data limit"),
    (lambda c: raw_upload(c, chunk("W", np.zeros(4))), INVALID, "unknown tensor 'W'; an upload holds X and y"),
])
def test_bad_uploads_are_refused_and_leave_nothing(client, server, make, code, match):
    before, files = client.list_datasets(), stored_files(server)
    with pytest.raises(grpc.RpcError) as e:
        make(client)
    assert e.value.code() == code and match in e.value.details(), e.value.details()
    assert client.list_datasets() == before and stored_files(server) == files


# --- a real data set --------------------------------------------------------------------
def numpy_adam_mlp(params, X, y, steps, lr, batch, seed):
    """Plain numpy: the same MLP, batches and Adam (torch's rule) in one process."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t in range(steps):
        rows, _ = batch_rows(seed, len(X), batch, t)
        _, g = ref.loss_and_grads("mlp", params, X[rows], y[rows])
        for k in params:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
            params[k] = params[k] - lr * (m[k] / (1 - 0.9 ** (t + 1))) / (np.sqrt(v[k] / (1 - 0.999 ** (t + 1))) + 1e-8)
    return params


def accuracy(params, X, y):
    return float(np.mean(ref.predict("mlp", params, X).argmax(1) == y))


def test_digits_mlp_through_the_service_matches_plain_numpy(client):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    train, test = holdout_split(0, len(X), 0.25)        # a fixed split: 1348 training, 449 test digits
    d = client.upload_dataset(X[train], y[train], name="digits", classes=10)
    job = client.create_job("mlp", hidden=32, shards=3, dtype="float64", dataset_id=d.dataset_id, outputs=10,
                            batch_size=64, learning_rate=0.01, seed=7, optimizer=optimizer("adam"))
    start = client.get_params(job.job_id)
    events = list(client.train(job.job_id, epochs=15))
    service_params = client.get_params(job.job_id)
    numpy_params = numpy_adam_mlp(dict(start), X[train], y[train], len(events), 0.01, 64, seed=7)
    acc_service, acc_numpy = accuracy(service_params, X[test], y[test]), accuracy(numpy_params, X[test], y[test])
    assert acc_numpy > 0.9
    assert abs(acc_service - acc_numpy) <= 0.01, (acc_service, acc_numpy)
    client.delete_job(job.job_id)
    client.delete_dataset(d.dataset_id)


# --- every optimizer through gRPC and Ray ---------------------------------------------
OPTIMIZER_CASES = {  # name: (client message, reference kwargs, schedule message, reference schedule, clip)
    "sgd-wd": (optimizer("sgd", weight_decay=0.05), dict(kind="sgd", wd=0.05), None, dict(kind="constant"), 0.0),
    "nesterov": (optimizer("momentum", momentum=0.8, nesterov=True), dict(kind="momentum", momentum=0.8,
                                                                         nesterov=True),
                 schedule("step", step_size=3, gamma=0.5, warmup_steps=2),
                 dict(kind="step", step_size=3, gamma=0.5, warmup=2), 0.0),
    "adam-clip": (optimizer("adam", weight_decay=0.01), dict(kind="adam", wd=0.01), None, dict(kind="constant"), 0.2),
    "adamw-cosine-clip": (optimizer("adamw", weight_decay=0.1), dict(kind="adamw", wd=0.1),
                          schedule("cosine", total_steps=6, warmup_steps=2, min_lr=0.001),
                          dict(kind="cosine", total=6, warmup=2, min_lr=0.001), 0.3),
}


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizers_through_the_api_equal_the_numpy_reference(client, tmp_path, case, shards):
    from test_optimizers import RefOptimizer, ref_lr

    opt_msg, opt_ref, sch_msg, sch_ref, clip = OPTIMIZER_CASES[case]
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((45, 8)), rng.integers(0, 3, 45)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    lr, steps, batch, seed = 0.05, 9, 10, 3
    job = client.create_job("mlp", hidden=5, shards=shards, dtype="float64", npz_path=str(tmp_path / "d.npz"),
                            seed=seed, learning_rate=lr, batch_size=batch, optimizer=opt_msg, schedule=sch_msg,
                            clip_norm=clip)
    params = client.get_params(job.job_id)
    events = list(client.train(job.job_id, steps=steps))
    names = list(params)
    flat = np.concatenate([params[k].ravel() for k in names])
    opt = RefOptimizer(lr_of=ref_lr(lr, **sch_ref), **opt_ref)
    for t in range(steps):
        rows, _ = batch_rows(seed, 45, batch, t)
        named, at = {}, 0
        for k in names:
            named[k] = flat[at: at + params[k].size].reshape(params[k].shape)
            at += params[k].size
        loss, g = ref.loss_and_grads("mlp", named, X[rows], y[rows])
        assert events[t].report.loss == pytest.approx(loss, rel=1e-10)
        g = np.concatenate([g[k].ravel() for k in names])
        scale = min(1.0, clip / (np.linalg.norm(g) + 1e-6)) if clip else 1.0
        assert events[t].report.clip_scale == pytest.approx(scale, rel=1e-12)
        flat = opt.step(flat, g * scale)
    got = client.get_params(job.job_id)
    got_flat = np.concatenate([got[k].ravel() for k in names])
    assert np.max(np.abs(got_flat - flat)) <= 1e-9 * np.max(np.abs(flat))
    client.delete_job(job.job_id)


def test_concurrent_uploads_cannot_exceed_the_data_limit(tmp_path):
    import threading

    from service.datasets import DatasetStore
    from service.errors import ResourceExhausted

    store = DatasetStore(str(tmp_path), max_bytes=10 << 20)
    n = (15 << 20) // 32
    X, y = np.zeros((n, 1)), np.zeros(n)                          # 7.5 MiB per upload
    outcomes = []

    def upload():
        try:
            store.add("big", X, y)
            outcomes.append("ok")
        except ResourceExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=upload) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "refused", "refused"] and store.used_bytes() <= 10 << 20
    (tmp_path / "data-garbage.json").write_text("{not json")
    assert len(DatasetStore(str(tmp_path), max_bytes=10 << 20).all()) == 1   # a damaged record is skipped
