"""The coordinator killed with SIGKILL and started again on the same --state-dir: its jobs come
back at their last complete checkpoint, with bitwise the parameters they had there. Stopped
with SIGTERM instead, it saves every job first: they come back at the step they reached."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client import Client, optimizer
from service.errors import NotFound, Unavailable
from service.jobs import JobConfig
from service.state import StateStore
from workers.shard import DataSpec

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state_dir, port, *flags):
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--ray-cpus", "2",
                             "--object-store-mb", "256", "--state-dir", str(state_dir), *flags], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = Client(f"127.0.0.1:{port}", timeout=120)
    client.wait_until_serving(timeout=120)
    return proc, client


def kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)       # the server and the Ray it started, with no chance to clean up
    proc.wait(timeout=30)


def test_a_killed_server_resumes_its_jobs_from_the_last_checkpoint(tmp_path):
    state, port = tmp_path / "state", free_port()
    proc, client = start_server(state, port)
    try:
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((60, 5)), rng.integers(0, 3, 60)
        upload = client.upload_dataset(X, y, name="kept", classes=3)
        job = client.create_job("mlp", hidden=6, shards=3, dtype="float64", dataset_id=upload.dataset_id,
                                outputs=3, batch_size=16, seed=4, optimizer=optimizer("adam"), learning_rate=0.02,
                                checkpoint_every=5)
        list(client.step(job.job_id, 10))                      # checkpoints at steps 5 and 10
        at_10 = client.get_params(job.job_id, flat=True)["flat"]
        list(client.step(job.job_id, 3))                       # steps 11..13: not checkpointed
        at_13 = client.get_params(job.job_id, flat=True)["flat"]
        manifest = json.loads((state / "jobs" / job.job_id / "manifest.json").read_text())
        assert manifest["step"] == 10 and manifest["shards"] == 3
        kill(proc)

        proc, client = start_server(state, port)
        [back] = client.list_jobs()
        assert back.job_id == job.job_id and back.step == 10 and back.checkpoint_step == 10
        assert [s.step for s in back.shards] == [10, 10, 10]
        np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"], at_10)
        # The client lost steps 11..13 and can tell (step 10 < 13); running them again gives the same result.
        list(client.step(job.job_id, 3, expected_step=10))
        np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"], at_13)
        assert [d.dataset_id for d in client.list_datasets()] == [upload.dataset_id]

        assert client.checkpoint(job.job_id).durable                 # on request: now at step 13
        kill(proc)
        proc, client = start_server(state, port)
        assert client.get_job(job.job_id).step == 13
        client.delete_job(job.job_id)
        assert not (state / "jobs" / job.job_id).exists()
    finally:
        if proc.poll() is None:
            kill(proc)


def test_a_graceful_stop_saves_every_job_where_it_stopped(tmp_path):
    state, port = tmp_path / "state", free_port()
    proc, client = start_server(state, port)
    try:
        moved = client.create_job("linear", rows=20, features=3, dtype="float64", checkpoint_every=5,
                                  optimizer=optimizer("adam"), learning_rate=0.05)
        list(client.step(moved.job_id, 7))               # periodic checkpoint at 5; steps 6 and 7 after it
        at_7 = client.get_params(moved.job_id, flat=True)["flat"]
        other = client.create_job("softmax", rows=12, features=4, outputs=3, shards=2, dtype="float64")
        list(client.step(other.job_id, 3))                # checkpoints every 50 steps: only at 0 until the stop
        proc.send_signal(signal.SIGTERM)                  # as Kubernetes stops a pod
        assert proc.wait(timeout=60) == 0
        manifest = json.loads((state / "jobs" / moved.job_id / "manifest.json").read_text())
        assert manifest["step"] == 7

        proc, client = start_server(state, port)
        assert sorted((j.job_id, j.step, j.checkpoint_step) for j in client.list_jobs()) == \
            sorted([(moved.job_id, 7, 7), (other.job_id, 3, 3)])
        np.testing.assert_array_equal(client.get_params(moved.job_id, flat=True)["flat"], at_7)
        # Adam's moments came back too: the next steps are those the stopped server would have run.
        list(client.step(moved.job_id, 2, expected_step=7))
        after = client.get_params(moved.job_id, flat=True)["flat"]
        kill(proc)

        fresh = tmp_path / "fresh"                        # the same job, never stopped
        proc, client = start_server(fresh, port)
        again = client.create_job("linear", rows=20, features=3, dtype="float64", checkpoint_every=5,
                                  optimizer=optimizer("adam"), learning_rate=0.05)
        list(client.step(again.job_id, 9))
        np.testing.assert_array_equal(client.get_params(again.job_id, flat=True)["flat"], after)
    finally:
        if proc.poll() is None:
            kill(proc)


def test_a_graceful_stop_in_the_middle_of_a_step_call_keeps_every_step_reported(tmp_path):
    state, port = tmp_path / "state", free_port()
    proc, client = start_server(state, port, "--grace-s", "0.5")
    try:
        spec = dict(rows=40, features=3, dtype="float64", batch_size=8, checkpoint_every=100_000,
                    optimizer=optimizer("adam"), learning_rate=0.05)
        job = client.create_job("linear", **spec)
        reports = client.step(job.job_id, 1_000_000)
        seen = [next(reports).step for _ in range(20)]    # the call is running: stop the server under it
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError):
            for r in reports:                             # the reports of the grace, then the stop
                seen.append(r.step)
        assert proc.wait(timeout=60) == 0

        proc, client = start_server(state, port)
        step = client.get_job(job.job_id).step
        assert step >= seen[-1] >= 20                      # no step the client was told of was lost
        kept = client.get_params(job.job_id, flat=True)["flat"]
        again = client.create_job("linear", **spec)       # the same job run to that step without a stop
        list(client.step(again.job_id, step))
        np.testing.assert_array_equal(kept, client.get_params(again.job_id, flat=True)["flat"])
    finally:
        if proc.poll() is None:
            kill(proc)


def test_a_job_that_cannot_be_saved_at_a_stop_is_logged_and_the_others_are_saved(ray_local, tmp_path, caplog):
    from service.coordinator import Coordinator
    coordinator = Coordinator(call_timeout_s=120, state=StateStore(str(tmp_path)))
    try:
        config = JobConfig("linear", DataSpec("synthetic", rows=8, seed=1), features=3, shards=2)
        first, bad, last = (coordinator.create_job(config) for _ in range(3))
        for job in (first, bad, last):
            list(coordinator.step(job.job_id, 3))
        bad.broken = "a test made it unusable"
        assert coordinator.save_all() == [first.job_id, last.job_id]
        assert f"could not save {bad.job_id} before stopping" in caplog.text
        assert {job_id: step for job_id, _, step, _ in StateStore(str(tmp_path)).load()} == \
            {first.job_id: 3, bad.job_id: 0, last.job_id: 3}   # the unusable one keeps its last checkpoint
        with pytest.raises(Unavailable, match="the server is stopping"):   # no step after its checkpoint
            list(coordinator.step(first.job_id, 1))
    finally:
        coordinator.close()


def states(n, step):
    return [{"theta": np.full(4, float(s + step)), "step": step, "opt_t": step, "m": None, "v": None}
            for s in range(n)]


def test_the_manifest_names_only_complete_checkpoints(tmp_path):
    store = StateStore(str(tmp_path))
    config = JobConfig("linear", DataSpec("synthetic", rows=4, seed=1), features=3)
    store.save_job("job-a", config)
    store.save_checkpoint("job-a", 5, states(2, 5))
    # A crash while writing step 10: its shard files exist, its manifest was never written.
    partial = tmp_path / "jobs" / "job-a" / "ckpt-10"
    partial.mkdir()
    np.savez(partial / "shard-0.npz", theta=np.zeros(4), step=10, opt_t=10)
    [(job_id, loaded, step, shard_states)] = store.load()
    assert (job_id, step, loaded) == ("job-a", 5, config)
    np.testing.assert_array_equal(shard_states[1]["theta"], np.full(4, 6.0))
    store.save_checkpoint("job-a", 15, states(2, 15))          # a complete set replaces the others
    names = sorted(p.name for p in (tmp_path / "jobs" / "job-a").iterdir())
    assert len(names) == 3 and names[0].startswith("ckpt-15-") and names[1:] == ["job.json", "manifest.json"]


def test_a_second_checkpoint_at_the_same_step_never_overwrites_the_named_set(tmp_path, monkeypatch):
    store = StateStore(str(tmp_path))
    store.save_job("job-c", JobConfig("linear", DataSpec("synthetic", rows=4, seed=1), features=3))
    store.save_checkpoint("job-c", 0, states(2, 0))
    # The same step again (SetParameters right after creation), and a crash before its manifest.
    import service.state as state_module
    real = state_module.write_atomic

    def crash_at_manifest(path, write):
        if path.name == "manifest.json":
            raise OSError("power cut")
        real(path, write)

    monkeypatch.setattr(state_module, "write_atomic", crash_at_manifest)
    with pytest.raises(OSError):
        store.save_checkpoint("job-c", 0, [{**st, "theta": st["theta"] + 100} for st in states(2, 0)])
    monkeypatch.setattr(state_module, "write_atomic", real)
    [(_, _, step, shard_states)] = store.load()
    assert step == 0
    np.testing.assert_array_equal(shard_states[1]["theta"], np.full(4, 1.0))   # the first set, intact


def test_a_damaged_checkpoint_is_not_resumed(tmp_path, caplog):
    store = StateStore(str(tmp_path))
    store.save_job("job-b", JobConfig("linear", DataSpec("synthetic", rows=4, seed=1), features=3))
    store.save_checkpoint("job-b", 3, states(1, 3))
    [shard] = (tmp_path / "jobs" / "job-b").glob("ckpt-3-*/shard-0.npz")
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert store.load() == []
    assert "does not match its checksum" in caplog.text


def test_jobs_are_resumed_in_the_order_they_were_created(tmp_path, caplog):
    """job.json's created_ns orders them (older files without it come first, by id); a job whose
    stamp does not parse is not resumed, and the others still are."""
    import json

    store = StateStore(str(tmp_path))
    config = JobConfig("linear", DataSpec("synthetic", rows=4, seed=1), features=3)
    for job_id, created in (("job-a", 30), ("job-b", 10), ("job-c", 0), ("job-d", 20), ("job-e", 0), ("job-f", 5)):
        store.save_job(job_id, config, created)
        store.save_checkpoint(job_id, 1, states(1, 1))
    saved = tmp_path / "jobs" / "job-f" / "job.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "created_ns": "not a number"}))
    assert [job_id for job_id, _, _, _ in store.load()] == ["job-c", "job-e", "job-b", "job-d", "job-a"]
    assert "cannot resume job-f" in caplog.text


def test_serve_waits_its_placement_timeout_for_a_job_it_cannot_place(tmp_path):
    """--placement-timeout-s reaches the jobs: three STRICT_SPREAD shards on a one-node Ray."""
    proc, client = start_server(tmp_path / "state", free_port(), "--placement-timeout-s", "1.5")
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.create_job("softmax", shards=3, placement="STRICT_SPREAD", rows=20, features=4, outputs=3)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot place 3 shards with placement STRICT_SPREAD" in e.value.details()
        assert "within 1.5 s" in e.value.details()
    finally:
        kill(proc)
