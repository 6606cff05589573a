"""The job registry on its own: what the server's threads see when two calls take the same job."""
import threading
import time
from types import SimpleNamespace

import pytest

from service.errors import NotFound
from service.jobs import JobRegistry


def test_a_job_is_popped_once_and_then_unknown():
    jobs = JobRegistry()
    job = SimpleNamespace(job_id="job-a")              # the registry reads nothing else of a job
    jobs.add(job, max_jobs=4)
    assert jobs.pop("job-a") is job and jobs.count() == 0
    with pytest.raises(NotFound):
        jobs.pop("job-a")
    with pytest.raises(ValueError):
        jobs.pop("")


class SlowToLetGo:
    """A lock that pauses after each release: another thread then gets in between two holds,
    as it may at any moment on a busy server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()
        time.sleep(0.002)


def test_of_many_threads_popping_one_job_exactly_one_gets_it():
    for _ in range(5):
        jobs = JobRegistry()
        jobs._lock = SlowToLetGo()
        jobs.add(SimpleNamespace(job_id="job-b"), max_jobs=4)
        got, refused, start = [], [], threading.Barrier(8)

        def take():
            start.wait()
            try:
                got.append(jobs.pop("job-b"))
            except NotFound:
                refused.append(1)
            except Exception as exc:                   # e.g. a KeyError from a lookup and a removal apart
                refused.append(exc)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 1 and refused == [1] * 7


def test_a_stopping_registry_lets_go_of_every_job_and_calls_it_unavailable_not_unknown():
    from service.errors import Unavailable
    jobs = JobRegistry()
    a, b = SimpleNamespace(job_id="job-a"), SimpleNamespace(job_id="job-b")
    jobs.add(a, max_jobs=4)
    jobs.add(b, max_jobs=4)
    jobs.stopping = True
    assert jobs.take_all() == [a, b] and jobs.count() == 0
    for call in (lambda: jobs.get("job-a"), lambda: jobs.pop("job-b"), lambda: jobs.add(a, max_jobs=4)):
        with pytest.raises(Unavailable, match="the server is stopping"):
            call()
    with pytest.raises(NotFound):
        jobs.get("job-never")                          # a job it never had is still unknown
    with pytest.raises(NotFound):
        JobRegistry().get("job-a")                     # an unknown job, while the server runs
