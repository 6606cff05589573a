"""A job's life when things go wrong: deleted mid-call, a dead shard, a failed or diverging step."""
import threading

import grpc
import numpy as np
import pytest

from processes import wait_until_gone
from service.client import optimizer
from service.coordinator import Coordinator
from service.errors import FailedPrecondition, NotFound, Unavailable
from service.jobs import JobConfig
from service.shard_group import LocalShardGroup
from service.state import StateStore
from workers.shard import DataSpec, Shard


def local_job(c, rows=30, **kwargs):
    cfg = dict(model="softmax", data=DataSpec("synthetic", rows=rows, seed=1), features=6, outputs=3, shards=3,
               dtype="float64")
    cfg.update(kwargs)
    return c.create_job(JobConfig(**cfg))


def test_deleting_a_job_during_a_long_step_ends_the_step_with_not_found(client):
    job = client.create_job("softmax", shards=2, rows=200, features=50, outputs=3)
    stream = client.step(job.job_id, steps=1_000_000)
    next(stream)
    client.delete_job(job.job_id)
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "was deleted" in e.value.details()


def test_a_dead_shard_is_replaced_and_the_call_answers_unavailable_once(client, server, ray_local):
    job = client.create_job("softmax", shards=2, rows=20, features=6, outputs=3, dtype="float64")
    list(client.step(job.job_id, 3))
    _, before = client.gradient(job.job_id, flat=True)
    actor = server[1].jobs.get(job.job_id).group.actors[1]
    pid = ray_local.get(actor.pid.remote())
    ray_local.kill(actor)
    wait_until_gone(pid)      # ray.kill returns before the process is gone
    with pytest.raises(grpc.RpcError) as e:
        client.gradient(job.job_id)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the shard was restarted at step 3: retry the call" in e.value.details()
    _, after = client.gradient(job.job_id, flat=True)              # the retry works, on the same state
    np.testing.assert_array_equal(after["flat"], before["flat"])
    described = client.get_job(job.job_id)
    assert not described.error and [s.step for s in described.shards] == [3, 3]
    client.delete_job(job.job_id)


def pids(server, job_id):
    group = server[1].jobs.get(job_id).group
    return [__import__("ray").get(a.pid.remote()) for a in group.actors]


def test_shards_that_cannot_answer_are_found_in_one_restart_timeout_not_one_each(client, server):
    """Two shards hung (SIGSTOP), as on a node that hangs or vanishes: recovery asks every shard
    at once, so it knows both are dead after one restart timeout; then both are replaced."""
    import os
    import signal
    import time

    from service.recovery import recover

    job = client.create_job("softmax", shards=3, rows=20, features=6, outputs=3, dtype="float64")
    list(client.step(job.job_id, 3))
    before = client.get_params(job.job_id, flat=True)["flat"]
    held = server[1].jobs.get(job.job_id)
    group, hung, restarts = held.group, pids(server, job.job_id)[:2], []
    timeout_s = 10.0
    group._restart_timeout_s = timeout_s
    restart = group._restart

    def timed_restart(s, data):
        restarts.append((s, time.monotonic() - t0))
        restart(s, data)
    group._restart = timed_restart
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with held.lock:
            replaced = recover(held)
    finally:
        for pid in hung:
            try:
                os.kill(pid, signal.SIGKILL)              # ray.kill may have ended them already
            except ProcessLookupError:
                pass
    try:
        assert replaced == [0, 1] and [s for s, _ in restarts] == [0, 1]
        assert timeout_s <= restarts[0][1] < 1.5 * timeout_s, restarts    # one after one the wait was 2 x 10 s
        assert not set(pids(server, job.job_id)[:2]) & set(hung)
        np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"], before)
    finally:
        client.delete_job(job.job_id)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_shard_process_killed_mid_training_is_recovered_and_the_run_matches(client, server, dtype):
    import os
    import signal

    def make():
        return client.create_job("mlp", hidden=12, shards=3, rows=90, features=7, outputs=3, dtype=dtype, seed=5,
                                 batch_size=16, optimizer=optimizer("adam"), learning_rate=0.01, checkpoint_every=10)
    clean = make()
    list(client.train(clean.job_id, steps=40))
    expected = client.get_params(clean.job_id, flat=True)["flat"]

    job = make()
    victim = pids(server, job.job_id)[1]
    stream = client.train(job.job_id, steps=40)
    steps = []
    for event in stream:
        steps.append(event.report.step)
        if event.report.step == 15:
            os.kill(victim, signal.SIGKILL)                        # the real worker process of shard 1
    assert steps == list(range(1, 41))                            # the client saw every step, no error
    assert pids(server, job.job_id)[1] != victim
    got = client.get_params(job.job_id, flat=True)["flat"]
    np.testing.assert_array_equal(got, expected)                   # bitwise the uninterrupted run
    described = client.get_job(job.job_id)
    assert described.step == 40 and described.checkpoint_step == 40 and not described.error
    for j in (clean, job):
        client.delete_job(j.job_id)


def test_a_step_that_fails_part_way_marks_the_job_broken(monkeypatch):
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    original = Shard.backward_apply

    def fail_on_shard_1(self, *args, **kwargs):
        if self.index == 1:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Shard, "backward_apply", fail_on_shard_1)
    with pytest.raises(RuntimeError):
        list(c.step(job.job_id, 1))
    assert "step 1 failed in the shards (RuntimeError: disk on fire)" in job.broken
    with pytest.raises(FailedPrecondition, match="is unusable"):
        c.gradient(job.job_id)


def test_a_diverging_step_is_refused_before_anything_changes():
    c = Coordinator(LocalShardGroup)
    job = local_job(c, model="linear", outputs=1)
    list(c.step(job.job_id, 1, learning_rate=1e200))        # finite, but the parameters are now ~1e200
    theta = c.get_params(job.job_id)
    assert np.all(np.isfinite(theta)) and np.abs(theta).max() > 1e100
    with pytest.raises(FailedPrecondition, match="the loss is inf at step 2"):
        list(c.step(job.job_id, 1, learning_rate=1e200))
    np.testing.assert_array_equal(c.get_params(job.job_id), theta)
    assert job.step == 1 and not job.broken
    c.set_params(job.job_id, {"flat": np.zeros_like(theta)})        # the client can repair it
    assert np.isfinite(next(iter(c.step(job.job_id, 1))).loss)


def test_shards_drop_batch_copies_after_each_call():
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    c.evaluate(job.job_id, rows=np.arange(30))
    c.gradient(job.job_id, rows=np.arange(30))
    list(c.step(job.job_id, 2))
    c.check_gradient(job.job_id, coords_per_shard=3)
    assert all(shard._pending is None for shard in job.group.shards)


def test_calls_on_a_deleted_job_object_are_not_found():
    c = Coordinator(LocalShardGroup)
    job = local_job(c)
    stream = c.step(job.job_id, 5)
    next(stream)
    done = threading.Event()
    threading.Thread(target=lambda: (c.delete_job(job.job_id), done.set())).start()
    done.wait(5)
    with pytest.raises(NotFound, match="was deleted"):
        next(stream)


@pytest.mark.parametrize("saved", [True, False], ids=["saved by a graceful stop", "closed at shutdown"])
def test_a_step_call_still_running_when_the_server_stops_hears_unavailable_not_not_found(tmp_path, saved):
    # The job is not gone: with --state-dir it resumes at the next start, so a client must not
    # be told NOT_FOUND.
    c = Coordinator(LocalShardGroup, state=StateStore(str(tmp_path)) if saved else None)
    job = local_job(c)
    upload = c.datasets.add("an upload", np.ones((4, 3)), np.array([0, 1, 0, 1]))
    stream = c.step(job.job_id, 5)
    assert next(stream).step == 1                        # step 2 is in flight; the job's lock is free
    if saved:
        assert c.save_all() == [job.job_id]              # settles step 2, saves it, closes the job
        assert c.shard_steps(job.job_id) == [2] * 3      # GetJob: at its step, not unusable (-1)
    c.close()                                            # without a save, the step in flight ends with the shards
    if saved:
        assert next(stream).step == 2                    # the report of the step saved comes first
    with pytest.raises(Unavailable, match="the server is stopping"):
        next(stream)
    with pytest.raises(Unavailable, match="the server is stopping"):     # a call that looks the job up after
        c.get_params(job.job_id)
    with pytest.raises(Unavailable, match="the server is stopping"):
        local_job(c)
    with pytest.raises(NotFound):
        c.get_params("job-it-never-had")                 # still unknown
    with pytest.raises(Unavailable, match="the server is stopping"):     # a job resumed later may need it
        c.delete_dataset(upload.dataset_id)
    if saved:
        assert [step for _, _, step, _ in StateStore(str(tmp_path)).load()] == [2]


def test_resumed_jobs_are_listed_in_the_order_they_were_created(tmp_path):
    c = Coordinator(LocalShardGroup, state=StateStore(str(tmp_path)))
    made = [local_job(c).job_id for _ in range(6)]          # random ids: sorted, 1 chance in 720 of this order
    c.save_all()
    c.close()
    again = Coordinator(LocalShardGroup, state=StateStore(str(tmp_path)))
    assert again.resume() and [job.job_id for job in again.jobs.all()] == made
    again.close()


def test_a_job_whose_save_fails_at_a_stop_takes_no_step_the_next_start_would_not_have(tmp_path, monkeypatch):
    store = StateStore(str(tmp_path))
    c = Coordinator(LocalShardGroup, state=store)
    kept, lost = local_job(c), local_job(c)
    for job in (kept, lost):
        list(c.step(job.job_id, 2))
    write = store.save_checkpoint

    def full_disk_for_one(job_id, step, states):
        if job_id == lost.job_id:
            raise OSError(28, "No space left on device")
        write(job_id, step, states)
    monkeypatch.setattr(store, "save_checkpoint", full_disk_for_one)
    assert c.save_all() == [kept.job_id]
    with pytest.raises(Unavailable, match="the server is stopping"):
        list(c.step(lost.job_id, 1))                     # its disk state stays at its last checkpoint: step 0
    assert {job_id: step for job_id, _, step, _ in StateStore(str(tmp_path)).load()} == \
        {kept.job_id: 2, lost.job_id: 0}
    c.close()


def test_bytes_per_step_do_not_depend_on_the_parameter_count():
    c = Coordinator(LocalShardGroup)
    moved = []
    for features in (10, 1000, 20000):
        job = local_job(c, features=features, batch_size=8, rows=64, dtype="float32")
        r = next(iter(c.step(job.job_id, 1)))
        moved.append((job.spec.n_params, r.bytes_to_shards, r.bytes_from_shards))
        c.delete_job(job.job_id)
    assert moved[0][0] * 1000 < moved[2][0]
    assert {m[1:] for m in moved} == {moved[0][1:]}
    # to each of 3 shards: 8 row indices and dZ (8 x 3 float32); back: Z_s and four scalars
    assert moved[0][1:] == (3 * (8 * 8 + 8 * 3 * 4), 3 * (8 * 3 * 4 + 16) + 3 * 16)


def test_a_retried_step_request_with_expected_step_is_never_applied_twice(client):
    job = client.create_job("linear", rows=20, features=3, dtype="float64")
    first = list(client.step(job.job_id, 2, expected_step=0))
    after_first = client.get_params(job.job_id, flat=True)["flat"]
    with pytest.raises(grpc.RpcError) as e:          # the same request again, as a retry would send it
        list(client.step(job.job_id, 2, expected_step=0))
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert "is at step 2, the request expected step 0; nothing was applied" in e.value.details()
    np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"], after_first)
    assert [r.step for r in first] == [1, 2] and client.get_job(job.job_id).step == 2
    assert [e.report.step for e in client.train(job.job_id, steps=1, expected_step=2)] == [3]
    with pytest.raises(grpc.RpcError) as e:
        list(client.train(job.job_id, steps=1, expected_step=2))
    assert e.value.code() == grpc.StatusCode.ABORTED
    client.delete_job(job.job_id)


def test_the_number_of_jobs_is_limited():
    from service.errors import ResourceExhausted
    from service.jobs import Limits

    c = Coordinator(LocalShardGroup, limits=Limits(max_jobs=2))
    first = local_job(c)
    local_job(c)
    with pytest.raises(ResourceExhausted, match="holds 2 jobs, its limit"):
        local_job(c)
    c.delete_job(first.job_id)
    assert local_job(c).job_id                     # room again after a delete


def test_parameters_set_by_a_client_survive_a_shard_death(client, server):
    import os
    import signal

    job = client.create_job("linear", shards=2, rows=30, features=4, dtype="float64", checkpoint_every=100)
    list(client.step(job.job_id, 3))
    mine = {"W": np.arange(4.0).reshape(4, 1), "b": np.array([0.5])}
    client.set_params(job.job_id, mine)
    assert client.get_job(job.job_id).checkpoint_step == 3            # the set values are the new base
    list(client.step(job.job_id, 2, learning_rate=0.05))
    expected = client.get_params(job.job_id, flat=True)["flat"]
    os.kill(pids(server, job.job_id)[0], signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as e:
        client.gradient(job.job_id)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # restored from the checkpoint with the client's values, and the two steps (lr 0.05) replayed
    np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"], expected)
    client.delete_job(job.job_id)


def test_a_shard_dying_during_the_periodic_checkpoint_does_not_fail_the_step(monkeypatch):
    from service.errors import ShardUnavailable

    c = Coordinator(LocalShardGroup)
    job = local_job(c, checkpoint_every=2, batch_size=8)
    twin = local_job(c, checkpoint_every=2, batch_size=8)
    real, failed = Shard.state, []

    def dies_once(self):
        if not failed and self.index == 2:
            failed.append(True)
            raise ShardUnavailable("a shard died during state: RayActorError; retry the call")
        return real(self)

    monkeypatch.setattr(Shard, "state", dies_once)
    reports = list(c.step(job.job_id, 5))
    assert failed and [r.step for r in reports] == [1, 2, 3, 4, 5] and not job.broken
    assert job.checkpoint.step == 4
    list(c.step(twin.job_id, 5))
    np.testing.assert_array_equal(c.get_params(job.job_id), c.get_params(twin.job_id))


@pytest.mark.parametrize("deaths, recovered", [
    ({3, 4}, True),           # at step 3, then at the replay's first step: a second round
    ({3, 5}, True),           # at step 3, then at the replay's second step, the first one applied
    ({3, 4, 5}, True),        # ... and in the second round too: the third round recovers
    ({3, 4, 5, 6}, False),    # a death in each of the three rounds: the job is unusable
], ids=["second round", "part way through the replay", "third round", "three rounds fail"])
def test_a_shard_dying_during_a_recovery_starts_it_again_up_to_three_rounds(monkeypatch, deaths, recovered):
    """Shard 1 dies at the update calls numbered in `deaths` (its third is step 3's; the ones after
    are the recovery's replay of steps 1 and 2, round after round)."""
    from service.errors import ShardUnavailable

    c = Coordinator(LocalShardGroup)
    job = local_job(c, checkpoint_every=4, batch_size=8)
    twin = local_job(c, checkpoint_every=4, batch_size=8)
    real, calls = Shard.backward_apply, []

    def dies(self, *args, **kwargs):
        if self.index == 1:
            calls.append(True)
            if len(calls) in deaths:
                raise ShardUnavailable("a shard died during backward_apply: ChannelLost; retry the call")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Shard, "backward_apply", dies)
    if recovered:
        assert [r.step for r in c.step(job.job_id, 3)] == [1, 2, 3] and not job.broken
        list(c.step(twin.job_id, 3))
        np.testing.assert_array_equal(c.get_params(job.job_id), c.get_params(twin.job_id))
    else:
        with pytest.raises(ShardUnavailable, match="could not be recovered"):
            list(c.step(job.job_id, 3))
        assert job.broken and len(calls) == 6           # step 3's call and one per round: no fourth round


def test_the_server_answers_unavailable_while_it_resumes(client, server):
    server[1].ready = False
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.list_jobs()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "the server is starting" in e.value.details()
    finally:
        server[1].ready = True
    client.list_jobs()


def test_a_refused_job_leaves_nothing_on_disk(tmp_path):
    from service.errors import ResourceExhausted
    from service.jobs import Limits
    from service.state import StateStore

    c = Coordinator(LocalShardGroup, limits=Limits(max_jobs=1), state=StateStore(str(tmp_path)))
    kept = local_job(c)
    with pytest.raises(ResourceExhausted):
        local_job(c)
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [kept.job_id]
    c.close()                                             # a shutdown keeps what is on disk
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [kept.job_id]
