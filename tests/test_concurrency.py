"""Calls on one job are serialized, calls on different jobs proceed in parallel, and a deadline or
a cancellation stops a long call at a step boundary."""
import threading
import time

import grpc
import numpy as np
import pytest


@pytest.fixture(scope="module")
def two_jobs(client):
    make = lambda seed: client.create_job("mlp", hidden=200, shards=2, rows=1000, features=300, outputs=5,
                                          batch_size=100, seed=seed, dtype="float64")
    a, b = make(1), make(2)
    yield a.job_id, b.job_id
    for j in (a, b):
        client.delete_job(j.job_id)


def test_another_job_is_served_while_one_trains(client, two_jobs):
    a, b = two_jobs
    stream = client.train(a, steps=100_000)
    next(stream)                                          # job a is now training
    answers = [client.evaluate(b).rows, client.get_job(b).step, len(list(client.step(b, 3)))]
    a_still_running = next(stream).report.step            # a kept going meanwhile
    stream.cancel()
    assert answers == [1000, 0, 3] and a_still_running >= 2


def test_calls_on_one_job_are_serialized(client, two_jobs):
    a, _ = two_jobs
    start = client.get_job(a).step
    threads = [threading.Thread(target=lambda: list(client.step(a, 5))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job = client.get_job(a)
    assert job.step == start + 20 and [s.step for s in job.shards] == [job.step] * 2


def test_a_deadline_stops_training_at_a_step_boundary(client, two_jobs):
    _, b = two_jobs
    start = client.get_job(b).step
    stream = client.stub.Train(__import__("gradshard.v1.gradshard_pb2", fromlist=["x"]).TrainRequest(
        job_id=b, steps=1_000_000), timeout=1.5)
    with pytest.raises(grpc.RpcError) as e:
        for _ in stream:
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    job = client.get_job(b)                               # waits for a step in flight, then all agree
    assert start < job.step < start + 1_000_000
    assert [s.step for s in job.shards] == [job.step] * 2
    before = client.get_params(b, flat=True)["flat"]
    again = client.get_job(b).step
    assert again == job.step                              # nothing kept running after the deadline
    np.testing.assert_array_equal(client.get_params(b, flat=True)["flat"], before)


def test_list_jobs_does_not_wait_for_a_call_in_flight(client, server, two_jobs):
    """ListJobs answers at once while a call holds a job, with the job's step for each of its shards."""
    a, _ = two_jobs
    job = server[1].jobs.get(a)
    step = client.get_job(a).step
    held, release = threading.Event(), threading.Event()

    def hold():                                  # what a long step does: hold the job's lock
        with job.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        t0 = time.monotonic()
        listed = next(j for j in client.list_jobs() if j.job_id == a)
        assert time.monotonic() - t0 < 5         # not the 30 s the holder would take
        assert listed.step == step and [s.step for s in listed.shards] == [step] * 2
    finally:
        release.set()
        holder.join()
    assert [s.step for s in client.get_job(a).shards] == [step] * 2      # free again: the shards are asked
