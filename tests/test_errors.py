"""Bad requests get the promised status and a message naming the field; the server keeps serving."""
import grpc
import numpy as np
import pytest

from gradshard.v1 import gradshard_pb2 as pb

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def good_job(client):
    """A float64 softmax job (9 features, 4 classes, 3 shards) that every bad request must leave intact."""
    job = client.create_job("softmax", shards=3, dtype="float64", rows=20, features=9, outputs=4, seed=1)
    return job, client.get_params(job.job_id)


def expect(code, match, call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    assert e.value.code() == code, e.value.details()
    assert match in e.value.details(), e.value.details()


def create(client, **overrides):
    fields = dict(model=pb.SOFTMAX, shards=2, data=pb.DataSource(synthetic=pb.SyntheticData(rows=10, features=4,
                                                                                            outputs=3)))
    fields.update(overrides)
    return client.stub.CreateJob(pb.CreateJobRequest(**fields), timeout=60)


@pytest.mark.parametrize("overrides,match", [
    (dict(model=pb.MODEL_UNSPECIFIED), "model must be one of LINEAR, LOGISTIC, SOFTMAX, MLP, got MODEL_UNSPECIFIED"),
    (dict(model=99), "model must be one of LINEAR, LOGISTIC, SOFTMAX, MLP, got 99"),
    (dict(shards=0), "shards must be >= 1, got 0"),
    (dict(shards=5), "shards must be between 1 and 4 (the number of units), got 5"),
    (dict(dtype=pb.INT64), "dtype must be FLOAT32 or FLOAT64, got INT64"),
    (dict(data=pb.DataSource()), "data is required"),
    (dict(data=pb.DataSource(synthetic=pb.SyntheticData(rows=0, features=4, outputs=3))),
     "data.synthetic.rows must be >= 1, got 0"),
    (dict(data=pb.DataSource(synthetic=pb.SyntheticData(rows=5, features=0, outputs=3))),
     "data.synthetic.features must be >= 1, got 0"),
    (dict(data=pb.DataSource(synthetic=pb.SyntheticData(rows=5, features=4, outputs=1))),
     "softmax needs at least 2 classes, got 1"),
    (dict(hidden=3), "hidden must be 0 for softmax, got 3"),
    (dict(activation=pb.TANH), "activation applies to mlp only"),
    (dict(cpus_per_shard=1e-9), "cpus_per_shard must be 0 (reserve none) or >= 0.01"),
    (dict(data=pb.DataSource(synthetic=pb.SyntheticData(rows=5, features=4, outputs=-2))),
     "data.synthetic.outputs must be >= 0"),
    (dict(model=pb.MLP), "hidden must be >= 1 for mlp, got 0"),
    (dict(learning_rate=-1.0), "learning_rate must be finite and > 0, got -1.0"),
    (dict(learning_rate=float("nan")), "learning_rate must be finite and > 0"),
    (dict(l2=-0.5), "l2 must be finite and >= 0"),
    (dict(batch_size=-3), "batch_size must be >= 0"),
])
def test_create_job_refuses_bad_fields(client, overrides, match):
    expect(INVALID, match, create, client, **overrides)


def test_data_file_problems(client, tmp_path):
    expect(NOT_FOUND, "no such file", create, client, data=pb.DataSource(npz_path=str(tmp_path / "none.npz")))
    np.savez(tmp_path / "empty.npz", X=np.zeros((0, 4)), y=np.zeros(0, np.int64))
    expect(INVALID, "rows and features >= 1", create, client, data=pb.DataSource(npz_path=str(tmp_path / "empty.npz")))
    np.savez(tmp_path / "labels.npz", X=np.zeros((5, 4)), y=np.array([0, 1, 2, 7, 1]))
    expect(INVALID, "class labels in [0, 3)", client.create_job, "softmax", shards=2, outputs=3,
           npz_path=str(tmp_path / "labels.npz"))
    np.savez(tmp_path / "nan.npz", X=np.array([[1.0, np.nan]] * 3), y=np.array([0, 1, 1]))
    expect(INVALID, "has 3 values that are not finite in float32", client.create_job, "logistic", shards=2,
           npz_path=str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "big.npz", X=np.array([[1.0, 1e300]] * 3), y=np.array([0, 1, 1]))   # overflows float32
    expect(INVALID, "not finite in float32", client.create_job, "logistic", npz_path=str(tmp_path / "big.npz"))
    np.savez_compressed(tmp_path / "corrupt.npz", X=np.random.default_rng(0).random((300, 40)), y=np.zeros(300))
    raw = bytearray((tmp_path / "corrupt.npz").read_bytes())
    raw[600:640] = bytes(40)                       # damage X's compressed data, not its header
    (tmp_path / "corrupt.npz").write_bytes(bytes(raw))
    expect(INVALID, "cannot be read", client.create_job, "linear", npz_path=str(tmp_path / "corrupt.npz"))
    np.savez(tmp_path / "noy.npz", X=np.zeros((3, 2)))
    expect(INVALID, "has no array 'y'", client.create_job, "logistic", npz_path=str(tmp_path / "noy.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    expect(INVALID, "is not an npz", client.create_job, "logistic", npz_path=str(tmp_path / "junk.npz"))


def test_unknown_job_is_not_found_everywhere(client):
    for call, args in [(client.get_job, ()), (client.delete_job, ()), (client.get_params, ()),
                       (client.gradient, ()), (client.evaluate, ()), (client.check_gradient, ()),
                       (client.step, (1,)), (client.set_params, ({"W": np.zeros((9, 4))},))]:
        expect(NOT_FOUND, "no job 'job-nope'", call, "job-nope", *args)
    expect(INVALID, "job_id is empty", client.get_job, "")


def test_bad_tensors_are_refused(client, good_job):
    job, _ = good_job
    jid = job.job_id
    expect(INVALID, "unknown tensor 'Q'; expected one of W, b, flat", client.set_params, jid, {"Q": np.zeros(3)})
    expect(INVALID, "tensor W has shape (3, 2), expected (9, 4)", client.set_params, jid, {"W": np.zeros((3, 2))})
    expect(INVALID, "tensor W has dtype float32, the job uses float64", client.set_params, jid,
           {"W": np.zeros((9, 4), np.float32)})
    bad = np.zeros((9, 4))
    bad[2, 3] = np.nan
    expect(INVALID, "tensor W has 1 non-finite values, first at (2, 3)", client.set_params, jid, {"W": bad})
    expect(INVALID, "non-finite", client.set_params, jid, {"b": np.array([0, np.inf, 0, 0.0])})
    expect(INVALID, "missing b", client.gradient, jid, params={"W": np.zeros((9, 4))})
    expect(INVALID, "either 'flat' or named", client.set_params, jid,
           {"flat": np.zeros(job.n_params), "b": np.zeros(4)})


def test_malformed_chunks_are_refused(client, good_job):
    job, _ = good_job

    def send(*chunks):
        msgs = [pb.SetParametersRequest(job_id=job.job_id)] + [pb.SetParametersRequest(chunk=c) for c in chunks]
        return client.stub.SetParameters(iter(msgs), timeout=30)

    expect(INVALID, "chunk holds at most 1048576 bytes", send,
           pb.TensorChunk(name="flat", dtype=pb.FLOAT64, shape=[job.n_params], data=b"\0" * (2 << 20)))
    expect(INVALID, "tensor W is incomplete: got 8 of 288 bytes", send,
           pb.TensorChunk(name="W", dtype=pb.FLOAT64, shape=[9, 4], data=b"\0" * 8))
    expect(INVALID, "chunk at offset 16, expected 0", send,
           pb.TensorChunk(name="W", dtype=pb.FLOAT64, shape=[9, 4], offset=16, data=b"\0" * 8))
    expect(INVALID, "dtype must be FLOAT32 or FLOAT64, got DTYPE_UNSPECIFIED", send,
           pb.TensorChunk(name="W", shape=[9, 4], data=b"\0" * 8))
    expect(INVALID, "the request stream is empty", client.stub.SetParameters, iter([]), timeout=30)


def test_bad_batches_steps_and_checks(client, good_job):
    jid = good_job[0].job_id
    expect(INVALID, "batch.rows must be in [0, 20), got 20", client.gradient, jid, rows=[0, 20])
    expect(INVALID, "batch.rows must be in [0, 20), got -1", client.evaluate, jid, rows=[-1])
    expect(INVALID, "steps must be >= 1, got 0", client.step, jid, 0)
    expect(INVALID, "learning_rate must be finite and >= 0", client.step, jid, 1, -0.1)
    expect(INVALID, "h must be finite and > 0", client.check_gradient, jid, h=-1.0)
    expect(INVALID, "indices must be in [0, 40), got 40", client.check_gradient, jid, indices=[3, 40])
    expect(INVALID, "coords_per_shard must be >= 0", client.check_gradient, jid, coords_per_shard=-2)
    expect(INVALID, "worst must be in [0, 100]", client.check_gradient, jid, worst=2 ** 62)
    expect(INVALID, "batch.rows holds 21 indices; at most 20", client.evaluate, jid, rows=[0] * 21)


EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="softmax", shards=2, rows=5, features=4, outputs=3, cpus_per_shard=3), "needs 6 CPUs"),
    (dict(model="linear", rows=10 ** 12, features=4), "the job needs about 16,000,000,000,040 bytes"),
    (dict(model="linear", rows=10, features=10 ** 12), "per job (server flag --max-params)"),
    (dict(model="softmax", rows=10, features=4, outputs=10 ** 12), "per job (server flag --max-params)"),
    (dict(model="mlp", hidden=4, rows=10 ** 6, features=5000, outputs=2, shards=2),
     "the limit is 17,179,869,184 (server flag --max-job-bytes)"),      # each MLP shard holds all of X
    (dict(model="mlp", hidden=1000, rows=10, features=4, outputs=2, shards=65), "shards=65 is more than this server "
                                                                             "allows (64; server flag --max-shards)"),
])
def test_requests_beyond_the_limits_are_resource_exhausted(client, kwargs, match):
    expect(EXHAUSTED, match, client.create_job, kwargs.pop("model"), **kwargs)


def test_huge_class_count_from_a_file_is_resource_exhausted(client, tmp_path):
    np.savez(tmp_path / "labels.npz", X=np.zeros((3, 1000)), y=np.array([0, 1, 10 ** 12]))
    expect(EXHAUSTED, "server flag --max-params", client.create_job, "softmax", npz_path=str(tmp_path / "labels.npz"))


def test_zz_after_all_bad_requests_the_job_is_intact_and_the_server_serves(client, good_job):
    """Runs last in this module: nothing committed was lost or changed."""
    job, params = good_job
    assert client.get_job(job.job_id).step == 0
    after = client.get_params(job.job_id)
    for name in params:
        np.testing.assert_array_equal(after[name], params[name])
    assert list(client.step(job.job_id, 1))[0].step == 1


def test_too_many_parameters_is_resource_exhausted(client):
    # 20,000 features x 10,000 classes: 200 million parameters, over the default 100 million
    expect(EXHAUSTED, "the model has 200,010,000 parameters; this server allows 100,000,000 per job",
           client.create_job, "softmax", rows=1, features=20_000, outputs=10_000)


def test_a_message_over_the_size_limit_is_resource_exhausted(client, good_job):
    big = pb.GetJobRequest(job_id="x" * (5 << 20))
    expect(EXHAUSTED, "", client.stub.GetJob, big, timeout=30)
    assert client.get_job(good_job[0].job_id).job_id == good_job[0].job_id
