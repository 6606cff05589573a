"""A shard gathers a kept forward's minibatch into memory reused from step to step, and nothing
else sees that memory change. Plain numpy shards: no Ray, no gRPC."""
from __future__ import annotations

import numpy as np
import pytest

from workers.models import ModelSpec
from workers.shard import DataSpec, Shard

ROWS = 40


def make(kind: str = "softmax", K: int = 3, hidden: int = 0, dtype: str = "float64") -> Shard:
    spec = ModelSpec(kind, 30, K, n_hidden=hidden)
    s = Shard(spec, spec.plan(2), 1, dtype, seed=3)
    s.load(DataSpec("synthetic", rows=ROWS, seed=5))
    return s


def gradient_at(shard: Shard, rows, dZ) -> np.ndarray:
    """The slice's gradient on `rows`, from a fresh shard with the same parameters (no buffer history)."""
    fresh = make(shard.spec.kind, shard.spec.n_outputs, shard.spec.n_hidden, str(shard.dtype))
    fresh.theta[:] = shard.theta
    fresh.forward(0, rows)
    return fresh.backward(0, dZ, want_grad=True)[1]


@pytest.mark.parametrize("kind,K,hidden", [("softmax", 3, 0), ("logistic", 1, 0), ("mlp", 2, 4)])
def test_kept_batches_reuse_one_buffer_and_give_the_gradient_of_their_rows(kind, K, hidden):
    s = make(kind, K, hidden)
    rng = np.random.default_rng(0)
    buffers = []
    for step, size in enumerate([8, 8, 5, 8, 12, 3]):          # smaller batches reuse it, a larger one regrows it
        rows = rng.choice(ROWS, size, replace=False)
        Z, _, _ = s.forward(step, rows, step_batch=True)
        np.testing.assert_array_equal(s._pending[2], s.X[rows])
        buffers.append(s._batch)
        # an evaluation between the forward and its backward gathers its own rows
        s.forward(100 + step, rng.choice(ROWS, 9, replace=False), keep=False)
        assert s._pending is None                               # keep=False leaves nothing pending...
        s.forward(step, rows, step_batch=True)                  # ...so the step's forward is run again
        dZ = np.tanh(Z)
        _, grad, _ = s.backward(step, dZ, want_grad=True)
        np.testing.assert_array_equal(grad, gradient_at(s, rows, dZ))
    assert buffers[0] is buffers[1] is buffers[2] is buffers[3]
    assert buffers[4] is not buffers[3] and buffers[4] is buffers[5] and len(buffers[4]) == 12


def test_a_kept_forward_gathers_into_the_buffer_and_an_unkept_one_does_not():
    s = make(dtype="float32")
    rows = np.array([3, 1, 4, 1, 5])                            # repeated rows are fine
    s.forward(0, rows, step_batch=True)
    kept = s._pending[2]
    assert np.shares_memory(kept, s._batch)
    s.forward(1, np.array([9, 2, 6]), keep=False)               # does not write into the buffer
    np.testing.assert_array_equal(s._batch[:5], s.X[rows])
    s.forward(2, rows, float64=True, step_batch=True)           # from a float64 copy of X: a fresh gather
    assert s._pending[2].dtype == np.float64 and not np.shares_memory(s._pending[2], s._batch)
    np.testing.assert_array_equal(s._batch[:5], s.X[rows])


def test_a_kept_forward_that_is_no_step_gathers_afresh():
    """A client's gradient on all rows must not leave a copy of X behind in the buffer."""
    s = make()
    s.forward(0, np.arange(8), step_batch=True)
    buffer = s._batch
    s.forward(1, np.arange(ROWS))                               # kept (a backward follows), but no step's batch
    assert s._batch is buffer and len(buffer) == 8 and not np.shares_memory(s._pending[2], buffer)
    np.testing.assert_array_equal(s._pending[2], s.X)


def test_rows_out_of_range_are_refused_and_leave_no_stale_forward():
    s = make()
    s.forward(0, np.array([0, 1, 2]), step_batch=True)
    for bad in ([0, ROWS], [-1, 2]):
        with pytest.raises(IndexError, match=r"rows must be in \[0, 40\)"):
            s.forward(1, np.array(bad), step_batch=True)
    with pytest.raises(TypeError, match="integers"):
        s.forward(1, np.ones(ROWS, bool), step_batch=True)     # a mask is not a list of rows
    # the pending forward of call 0 may have had its rows overwritten: it is gone, not silently wrong
    with pytest.raises(RuntimeError, match="no forward for call 0"):
        s.backward(0, np.zeros((3, 3)))


def test_the_coordinators_steps_gather_into_the_buffer_and_its_gradient_calls_do_not():
    from service.coordinator import Coordinator
    from service.jobs import JobConfig
    from service.shard_group import LocalShardGroup

    coordinator = Coordinator(LocalShardGroup)
    job = coordinator.create_job(JobConfig("softmax", DataSpec("synthetic", rows=ROWS, seed=2), features=30,
                                           outputs=3, shards=2, batch_size=8))
    shards = job.group.shards
    list(coordinator.step(job.job_id, 3))                       # the first forward, then prefetched ones
    buffers = [s._batch for s in shards]
    assert all(b is not None and len(b) == 8 for b in buffers)
    coordinator.gradient(job.job_id, np.arange(ROWS))           # all rows, kept for its backward
    list(coordinator.step(job.job_id, 2))
    assert all(s._batch is b and len(b) == 8 for s, b in zip(shards, buffers))
    coordinator.close()


def test_the_batch_counts_in_the_jobs_bytes_only_when_a_step_gathers_one():
    from service.jobs import JobConfig, job_bytes

    spec = ModelSpec("mlp", 30, 2, n_hidden=4)
    def need(**kw):
        return job_bytes(spec, JobConfig("mlp", DataSpec("synthetic", rows=100), features=30, outputs=2, hidden=4,
                                         shards=2, dtype="float64", **kw), 100)
    full = need()
    assert need(batch_size=100) == need(batch_size=500) == full           # every row: X itself, no gather
    assert need(batch_size=10) == full + 8 * 10 * 30 * 2                  # each MLP shard gathers 10 rows of 30
    assert need(holdout_fraction=0.2) == full + 8 * 100 * 30 * 2          # the training rows: about all of them
