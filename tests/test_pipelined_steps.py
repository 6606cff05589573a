"""A Step or Train call hands each step's report to its client while the shards run the next
step (Coordinator._steps): the results equal one step per call, another call settles the step
in flight, and a client that leaves stops the job at a step boundary."""
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


def break_backward_apply(monkeypatch, at_step, error, shard=None, once=False):
    """Shard.backward_apply raises `error` at step `at_step` (on shard `shard`, or on each; only
    the first time if `once`). Returns the indices of the shards that raised."""
    original, raised = Shard.backward_apply, []

    def breaking(self, token, dZ, step, *args, **kwargs):
        if step == at_step and shard in (None, self.index) and not (once and raised):
            raised.append(self.index)
            raise error
        return original(self, token, dZ, step, *args, **kwargs)

    monkeypatch.setattr(Shard, "backward_apply", breaking)
    return raised


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
    settled = c.get_params(job.job_id)               # a call on the job settles its step 2 first
    assert job.inflight is None and job.step == 2
    np.testing.assert_array_equal(settled, c.get_params(twin.job_id))
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
    job, twin = (local_job(c, model="linear", outputs=1, hidden=0) for _ in range(2))
    stream = c.step(job.job_id, 5, learning_rate=1e200)     # step 1 is finite; the loss of step 2 is not
    first = next(stream)
    assert first.step == 1 and np.isfinite(first.loss)
    with pytest.raises(FailedPrecondition, match="the loss is inf at step 2"):
        next(stream)
    assert job.step == 1 and not job.broken
    list(c.step(twin.job_id, 1, learning_rate=1e200))
    np.testing.assert_array_equal(c.get_params(job.job_id), c.get_params(twin.job_id))   # step 1, nothing of 2


def test_a_step_that_fails_in_the_shards_is_the_error_its_call_sees(monkeypatch):
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    break_backward_apply(monkeypatch, 3, RuntimeError("disk on fire"), shard=1)
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
    break_backward_apply(monkeypatch, 2, RuntimeError("disk on fire"))
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


def test_shard_steps_without_waiting_leave_a_step_in_flight_alone():
    """What ListJobs asks (wait=False) answers the job's step; what GetJob asks settles the step."""
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
    assert took < 5 and described.step > 1                # the steps went on without the reader
    assert [s.step for s in described.shards] == [described.step] * 2
    assert evaluated.step >= described.step
    deadline, kept = time.monotonic() + 30, server[1].jobs.get(job.job_id)
    while (kept.inflight is not None or kept.lock.locked()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kept.inflight is None                          # the cancelled call settled its last step itself
    after = client.get_job(job.job_id)
    assert [s.step for s in after.shards] == [after.step] * 2
    client.delete_job(job.job_id)


def test_a_shard_lost_in_a_step_in_flight_is_recovered_by_the_call_that_settles_it(monkeypatch):
    """Another call settles the step: it recovers the shards and retries the step, as the owner would."""
    from service.errors import ShardUnavailable

    c = Coordinator(LocalShardGroup)
    job, twin = local_job(c), local_job(c)
    lost = break_backward_apply(monkeypatch, 2, ShardUnavailable("a shard died during backward_apply: "
                                                                 "RayActorError; retry the call"), once=True)
    stream = c.step(job.job_id, 5)
    assert next(stream).step == 1                    # step 2 in flight, its shard lost
    list(c.step(twin.job_id, 2))
    settled = c.get_params(job.job_id)               # settles step 2: recovery, then the step again
    assert lost and job.step == 2 and not job.broken
    np.testing.assert_array_equal(settled, c.get_params(twin.job_id))
    assert [r.step for r in stream] == [2, 3, 4, 5]
    list(c.step(twin.job_id, 3))
    np.testing.assert_array_equal(c.get_params(job.job_id), c.get_params(twin.job_id))


def test_a_report_in_hand_comes_before_another_calls_failure(monkeypatch):
    """Call A's step 2 is settled by call B, whose own step 3 then fails: A still gets report 2."""
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    break_backward_apply(monkeypatch, 3, RuntimeError("disk on fire"))
    a = c.step(job.job_id, 5)
    assert next(a).step == 1
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(c.step(job.job_id, 3))                  # settles A's step 2, then fails its own step 3
    assert next(a).step == 2                         # applied by every shard: reported
    with pytest.raises(FailedPrecondition, match="step 3 failed in the shards"):
        next(a)


def test_a_report_in_hand_comes_before_not_found_when_the_job_is_deleted():
    from service.errors import NotFound

    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    stream = c.step(job.job_id, 5)
    assert next(stream).step == 1
    c.get_params(job.job_id)                         # settles step 2
    c.delete_job(job.job_id)
    assert next(stream).step == 2
    with pytest.raises(NotFound, match="was deleted"):
        next(stream)


def test_every_applied_step_is_counted_in_the_metrics_even_when_the_client_leaves():
    from service.metrics import Metrics

    c = Coordinator(LocalShardGroup, metrics=Metrics())
    job = local_job(c)
    stream = c.step(job.job_id, 100)
    assert [next(stream).step for _ in range(3)] == [1, 2, 3]
    stream.close()                                   # step 4 was in flight: settled and counted
    assert job.step == 4
    assert c.metrics.registry.get_sample_value("gradshard_steps_total", {"job_id": job.job_id}) == 4


def test_train_by_epochs_counts_from_the_step_in_flight():
    """A Step call left with a step in flight: Train(epochs=1) still ends at the epoch boundary."""
    c = Coordinator(LocalShardGroup)
    job = local_job(c)                               # 40 rows, batch 16: 3 steps an epoch
    stream = c.step(job.job_id, 10)
    assert next(stream).step == 1                    # step 2 in flight, job.step still 1
    events = list(c.train(job.job_id, epochs=1))
    assert [e.report.step for e in events] == [3] and job.step == 3
    stream.close()


def _twins(client):
    make = lambda: client.create_job("mlp", hidden=40, shards=2, rows=96, features=30, outputs=4, batch_size=32,
                                     seed=7, dtype="float64", learning_rate=0.05)
    return make(), make()


def test_calls_between_the_reports_on_real_shards_change_no_result(client, server):
    """Over gRPC and the lines: GetJob, GetParameters and Evaluate after every report of a Step call."""
    job, twin = _twins(client)
    seen = []
    for report in client.step(job.job_id, 8):
        seen.append(report.step)
        described = client.get_job(job.job_id)
        assert [s.step for s in described.shards] == [described.step] * 2 and described.step >= report.step
        client.get_params(job.job_id, flat=True)
        client.evaluate(job.job_id)
    assert seen == list(range(1, 9))
    list(client.step(twin.job_id, 8))
    np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"],
                                  client.get_params(twin.job_id, flat=True)["flat"])
    for j in (job, twin):
        client.delete_job(j.job_id)


def test_a_shard_killed_with_a_step_in_flight_is_recovered_and_the_run_matches(client, server, ray_local):
    import grpc

    from processes import wait_until_gone

    job, twin = _twins(client)
    actor = server[1].jobs.get(job.job_id).group.actors[1]
    pid = ray_local.get(actor.pid.remote())
    stream = client.step(job.job_id, 6)
    assert next(stream).step == 1                    # step 2 is in flight (or answered, unread)
    ray_local.kill(actor)
    wait_until_gone(pid)
    # Whichever call reaches the shards next (the Step call settling its step, or GetJob) finds
    # the shard dead: the step is retried after a recovery, or GetJob's own call is refused
    try:
        client.get_job(job.job_id)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "retry the call" in e.details()
    described = client.get_job(job.job_id)
    assert not described.error and [s.step for s in described.shards] == [described.step] * 2
    assert [r.step for r in stream] == [2, 3, 4, 5, 6]
    list(client.step(twin.job_id, 6))
    np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"],
                                  client.get_params(twin.job_id, flat=True)["flat"])
    for j in (job, twin):
        client.delete_job(j.job_id)
