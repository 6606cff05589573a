"""A Step or Train call hands each step's report to its client while the shards run the next
step (Coordinator._steps): the results equal one step per call, another call settles the step
in flight, and a client that leaves stops the job at a step boundary."""
import threading
import time

import numpy as np
import pytest

from service.coordinator import Coordinator
from service.errors import FailedPrecondition
from service.jobs import JobConfig
from service.shard_group import LocalShardGroup
from workers.shard import DataSpec, Shard


def local_job(c, **kwargs):
    cfg = dict(model="mlp", hidden=12, data=DataSpec("synthetic", rows=40, seed=1), features=7, outputs=3,
               shards=3, dtype="float64", batch_size=16, learning_rate=0.05)
    cfg.update(kwargs)
    return c.create_job(JobConfig(**cfg))


def shard_steps(job):
    return [shard.step for shard in job.group.shards]


@pytest.mark.parametrize("kwargs", [{}, {"clip_norm": 0.1}, {"dtype": "float32", "model": "softmax", "hidden": 0}],
                         ids=["fused", "clipped", "softmax-float32"])
def test_a_call_of_many_steps_equals_one_step_per_call(kwargs):
    c = Coordinator(LocalShardGroup)
    piped, single = local_job(c, **kwargs), local_job(c, **kwargs)
    reports = list(c.step(piped.job_id, 7))
    one_by_one = [next(iter(c.step(single.job_id, 1))) for _ in range(7)]
    assert [r.step for r in reports] == list(range(1, 8))
    for a, b in zip(reports, one_by_one):
        assert (a.loss, a.grad_norm, a.clip_scale, a.epoch) == (b.loss, b.grad_norm, b.clip_scale, b.epoch)
    if kwargs.get("clip_norm"):
        assert all(r.clip_scale < 1 for r in reports)            # the clipped path was taken
    np.testing.assert_array_equal(c.get_params(piped.job_id), c.get_params(single.job_id))
    assert piped.held_gradient.step == 7 and piped.inflight is None and shard_steps(piped) == [7] * 3


def test_each_report_is_handed_over_with_the_next_step_in_flight_and_the_lock_free():
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    seen = []
    for report in c.step(job.job_id, 4):
        seen.append((report.step, job.inflight is not None, job.lock.locked(), job.step))
    # steps 1-3 are reported while the next one runs; the last has nothing after it
    assert seen == [(1, True, False, 1), (2, True, False, 2), (3, True, False, 3), (4, False, False, 4)]


def test_another_call_between_reports_settles_the_step_in_flight_and_the_stream_goes_on():
    c = Coordinator(LocalShardGroup)
    job, twin = local_job(c), local_job(c)
    stream = c.step(job.job_id, 6)
    assert next(stream).step == 1
    assert job.inflight is not None
    list(c.step(twin.job_id, 2))
    np.testing.assert_array_equal(c.get_params(job.job_id), c.get_params(twin.job_id))   # step 2 settled
    assert job.inflight is None and job.step == 2
    evaluated = c.evaluate(job.job_id)           # a forward of its own: the prefetched one is void now
    assert evaluated.step == 2
    rest = list(stream)
    assert [r.step for r in rest] == [2, 3, 4, 5, 6]
    twin_rest = list(c.step(twin.job_id, 4))
    np.testing.assert_array_equal(c.get_params(job.job_id), c.get_params(twin.job_id))
    assert [r.loss for r in rest[1:]] == [r.loss for r in twin_rest]


def test_a_client_that_stops_reading_leaves_every_shard_at_the_same_step():
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    stream = c.step(job.job_id, 100)
    assert [next(stream).step for _ in range(3)] == [1, 2, 3]
    stream.close()                                # what the servicer does when its client is gone
    assert job.step == 4 and shard_steps(job) == [4] * 3 and job.inflight is None
    assert not job.lock.locked()
    assert [r.step for r in c.step(job.job_id, 2)] == [5, 6]


def test_train_evaluates_between_steps_and_matches_a_step_call():
    c = Coordinator(LocalShardGroup)
    trained = local_job(c, holdout_fraction=0.25)
    stepped = local_job(c, holdout_fraction=0.25)
    events = list(c.train(trained.job_id, steps=5, eval_every=2))
    assert [e.report.step for e in events] == [1, 2, 3, 4, 5]
    assert [e.evaluation is not None for e in events] == [False, True, False, True, True]
    list(c.step(stepped.job_id, 2))
    assert events[1].evaluation.loss == c.evaluate(stepped.job_id, split="holdout").loss
    list(c.step(stepped.job_id, 3))
    np.testing.assert_array_equal(c.get_params(trained.job_id), c.get_params(stepped.job_id))
    assert events[-1].evaluation.loss == c.evaluate(stepped.job_id, split="holdout").loss


def test_a_step_that_cannot_begin_fails_after_the_previous_report():
    c = Coordinator(LocalShardGroup)
    job = local_job(c, model="linear", outputs=1, hidden=0)
    stream = c.step(job.job_id, 5, learning_rate=1e200)     # step 1 is finite; the loss of step 2 is not
    first = next(stream)
    assert first.step == 1 and np.isfinite(first.loss)
    theta = c.get_params(job.job_id)
    with pytest.raises(FailedPrecondition, match="the loss is inf at step 2"):
        next(stream)
    assert job.step == 1 and not job.broken
    np.testing.assert_array_equal(c.get_params(job.job_id), theta)


def test_a_step_that_fails_in_the_shards_is_the_error_its_call_sees(monkeypatch):
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    original = Shard.backward_apply

    def fails_at_step_3(self, token, dZ, step, *args, **kwargs):
        if step == 3 and self.index == 1:
            raise RuntimeError("disk on fire")
        return original(self, token, dZ, step, *args, **kwargs)

    monkeypatch.setattr(Shard, "backward_apply", fails_at_step_3)
    stream = c.step(job.job_id, 5)
    assert [next(stream).step for _ in range(2)] == [1, 2]
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(stream)
    assert "step 3 failed in the shards (RuntimeError: disk on fire)" in job.broken
    with pytest.raises(FailedPrecondition, match="is unusable"):
        c.get_params(job.job_id)


def test_a_failed_step_settled_by_another_call_is_reported_to_both(monkeypatch):
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    original = Shard.backward_apply

    def fails_at_step_2(self, token, dZ, step, *args, **kwargs):
        if step == 2:
            raise RuntimeError("disk on fire")
        return original(self, token, dZ, step, *args, **kwargs)

    monkeypatch.setattr(Shard, "backward_apply", fails_at_step_2)
    stream = c.step(job.job_id, 5)
    assert next(stream).step == 1                    # step 2 is in flight, and failed
    with pytest.raises(FailedPrecondition, match="step 2 failed in the shards"):
        c.evaluate(job.job_id)                       # settles it: the job is unusable
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(stream)                                 # the call that began it sees the shards' error


def test_deleting_a_job_with_a_step_in_flight_ends_its_stream_with_not_found():
    from service.errors import NotFound

    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    stream = c.step(job.job_id, 50)
    next(stream)
    assert job.inflight is not None
    c.delete_job(job.job_id)
    assert job.inflight is None
    with pytest.raises(NotFound, match="was deleted"):
        next(stream)


def test_list_jobs_does_not_wait_for_a_step_in_flight():
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    stream = c.step(job.job_id, 50)
    next(stream)
    assert job.inflight is not None and job.step == 1
    assert c.shard_steps(job.job_id, wait=False) == [1] * 3 and job.inflight is not None
    assert c.shard_steps(job.job_id) == [2] * 3 and job.inflight is None      # GetJob settles it
    stream.close()


def test_a_stream_left_unread_does_not_hold_the_job(client, server):
    """Over gRPC: a client that takes one report and then stops reading leaves the job to others."""
    job = client.create_job("softmax", shards=2, rows=64, features=20, outputs=3, batch_size=16)
    stream = client.step(job.job_id, 1_000_000)
    next(stream)
    time.sleep(1.0)
    t0 = time.monotonic()
    described = client.get_job(job.job_id)
    took = time.monotonic() - t0
    evaluated = client.evaluate(job.job_id)
    stream.cancel()
    assert took < 5 and described.step >= 1
    assert [s.step for s in described.shards] == [described.step] * 2
    assert evaluated.step >= described.step
    deadline = time.monotonic() + 30
    while server[1].jobs.get(job.job_id).inflight is not None and time.monotonic() < deadline:
        time.sleep(0.05)                          # the cancelled call settles its last step
    after = client.get_job(job.job_id)
    assert [s.step for s in after.shards] == [after.step] * 2
    client.delete_job(job.job_id)
