"""Shards' parameters and kept gradients read from shared memory by a coordinator on their node
(workers.shared): another process's array seen live and read-only, anything else refused, and
through a real local Ray the same values as over the shards' lines."""
import multiprocessing as mp
import os
import tempfile

import numpy as np
import pytest

from workers.shared import SharedArray, alive, open_shared, shared_copy


def _owner(conn):
    """A process that shares an array, changes it when told, and exits when told."""
    a, where = shared_copy(np.arange(6, dtype=np.float32))
    conn.send(where)
    conn.recv()
    a[:] = -1
    conn.send("written")
    conn.recv()


def test_another_process_s_array_is_read_live_and_read_only():
    parent, child = mp.Pipe()
    p = mp.get_context("fork").Process(target=_owner, args=(child,))
    p.start()
    try:
        where = parent.recv()
        view = open_shared(where)
        np.testing.assert_array_equal(view, np.arange(6, dtype=np.float32))
        with pytest.raises(ValueError):
            view[0] = 5                                 # the coordinator cannot write a shard's memory
        parent.send("write")
        assert parent.recv() == "written"
        np.testing.assert_array_equal(view, -np.ones(6, np.float32))
        assert alive(where.pid)
        parent.send("exit")
        p.join(10)
        assert not alive(where.pid)
        np.testing.assert_array_equal(view, -np.ones(6, np.float32))   # mapped memory outlives its owner
    finally:
        p.kill()


def test_a_descriptor_that_is_not_a_shared_array_is_refused():
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 64)
        f.flush()
        with pytest.raises(OSError, match="not a shard's shared array"):
            open_shared(SharedArray(os.getpid(), f.fileno(), "<f4", 4))
    a, where = shared_copy(np.zeros(4, np.float64))
    with pytest.raises(OSError, match="smaller"):
        open_shared(SharedArray(where.pid, where.fd, "<f8", 400))
    with pytest.raises(OSError):
        open_shared(SharedArray(where.pid, 10_000, "<f8", 4))          # no such descriptor


def test_an_empty_array_is_shared_too():
    a, where = shared_copy(np.zeros(0, np.float32))
    assert a.size == 0 and open_shared(where).size == 0


@pytest.fixture(scope="module")
def coordinator(ray_local):
    from service.coordinator import Coordinator
    c = Coordinator(call_timeout_s=120)
    yield c
    c.close()


def _job(coordinator, **kw):
    from service.jobs import JobConfig
    from workers.shard import DataSpec
    return coordinator.create_job(JobConfig(model="softmax", data=DataSpec("synthetic", rows=16, seed=1),
                                            features=300, outputs=4, shards=3, dtype="float64", **kw))


def test_slices_lent_from_shared_memory_equal_the_shards_answers_on_their_lines(coordinator):
    job = _job(coordinator)
    list(coordinator.step(job.job_id, 3))
    group = job.group
    assert group._shared is not None and len(group._shared) == 3      # all on this node: mapped
    with job.lock, group._channel_lock:
        on_lines = {m: group._channels.call(m, (), {}, None, group.timeout_s) for m in ("get_params", "get_grad")}
    with job.lock:
        lent = {m: group.lend(m) for m in on_lines}
    for method, expected in on_lines.items():
        assert not any(v.flags.writeable for v in lent[method])          # the shards' memory, read-only
        for v, e in zip(lent[method], expected):
            np.testing.assert_array_equal(v, e)
    for keeps_views in (lambda p: p, lambda p: np.asarray(p[0])):
        with pytest.raises(RuntimeError, match="kept a view of a shard's memory"):
            coordinator.param_pieces(job.job_id, keeps_views)
    theta = coordinator.param_pieces(job.job_id)                       # the default read: private copies
    held = coordinator.held_gradient(job.job_id).pieces
    assert all(p.flags.writeable and p.flags.owndata for p in theta + held)
    list(coordinator.step(job.job_id, 1))
    # the lent views are live, which is why they are read under the job's lock; the copies are not
    for s in range(3):
        assert not np.array_equal(lent["get_params"][s], on_lines["get_params"][s])
        np.testing.assert_array_equal(theta[s], on_lines["get_params"][s])
    coordinator.delete_job(job.job_id)


def test_shards_that_cannot_be_mapped_answer_on_their_lines(coordinator, monkeypatch):
    import service.shard_group as shard_group

    def refuse(where):
        raise PermissionError("not allowed here")
    monkeypatch.setattr(shard_group, "open_shared", refuse)
    job = _job(coordinator, seed=4)
    list(coordinator.step(job.job_id, 2))
    assert job.group._shared is None
    theta = coordinator.get_params(job.job_id)
    monkeypatch.undo()
    reference = _job(coordinator, seed=4)
    list(coordinator.step(reference.job_id, 2))
    assert reference.group._shared is not None
    np.testing.assert_array_equal(theta, coordinator.get_params(reference.job_id))
    np.testing.assert_array_equal(coordinator.held_gradient(job.job_id).grad,
                                  coordinator.held_gradient(reference.job_id).grad)
    coordinator.delete_job(job.job_id)
    coordinator.delete_job(reference.job_id)
