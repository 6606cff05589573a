"""The `gradshard` command, run as a user would: a subprocess, against our server or embedded."""
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import reference as ref

GRADSHARD = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True, timeout=300):
    proc = subprocess.run([*GRADSHARD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def data_and_params(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((60, 8)), rng.integers(0, 3, 60)
    np.savez(d / "data.npz", X=X, y=y)
    params = ref.init_params("mlp", 8, 3, H=6, rng=rng)
    np.savez(d / "params.npz", **params)
    return d, X, y, params


def test_grad_against_a_server_writes_the_reference_gradient(server, data_and_params):
    d, X, y, params = data_and_params
    out = d / "grad.npz"
    proc = run("grad", "--server", server[0], "--model", "mlp", "--hidden", "6", "--data", str(d / "data.npz"),
               "--params", str(d / "params.npz"), "--shards", "3", "--dtype", "float64", "--out", str(out))
    loss, grads = ref.loss_and_grads("mlp", params, X, y)
    with np.load(out) as f:
        assert float(f["loss"]) == pytest.approx(loss, rel=1e-12)
        for name in grads:
            np.testing.assert_allclose(f[name], grads[name], rtol=1e-10, atol=1e-14)
    assert re.search(r"loss [0-9.]+ +\|grad\|", proc.stdout)


def test_check_passes_and_fails_on_its_tolerance(server, data_and_params):
    d = data_and_params[0]
    args = ["check", "--server", server[0], "--model", "mlp", "--hidden", "6", "--data", str(d / "data.npz"),
            "--dtype", "float64", "--shards", "2", "--coords", "20"]
    ok = run(*args)
    assert "OK: max abs error" in ok.stdout and ok.stdout.count("\n") >= 5
    strict = run(*args, "--tol", "0", check=False)
    assert strict.returncode == 1 and "FAILED" in strict.stdout


def test_grad_embedded_starts_its_own_ray_and_agrees_with_the_reference(data_and_params):
    d, X, y, params = data_and_params
    out = d / "grad_embedded.npz"
    run("grad", "--model", "mlp", "--hidden", "6", "--data", str(d / "data.npz"), "--params",
        str(d / "params.npz"), "--shards", "2", "--dtype", "float64", "--out", str(out))
    _, grads = ref.loss_and_grads("mlp", params, X, y)
    with np.load(out) as f:
        np.testing.assert_allclose(f["W1"], grads["W1"], rtol=1e-10, atol=1e-14)


def test_a_client_error_is_reported_with_its_status(server):
    proc = run("grad", "--server", server[0], "--model", "softmax", "--shards", "99", "--features", "4",
               check=False)
    assert proc.returncode == 2
    assert "INVALID_ARGUMENT: shards must be between 1 and 4" in proc.stderr


def test_demo_trains_and_reports_bytes(server):
    proc = run("demo", "--server", server[0], "--hidden", "40", "--rows", "2048", "--steps", "40", "--every", "20")
    m = re.search(r"after 40 steps: held-out loss ([0-9.]+) \(was ([0-9.]+)\)", proc.stdout)
    assert m and float(m.group(1)) < float(m.group(2)), proc.stdout
    assert re.search(r"moved [0-9,]+ B to / [0-9,]+ B from the shards", proc.stdout)
    assert "40/40" in proc.stdout                                       # the progress bar ran to the end


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_statuses_until_serving(address, timeout=90):
    """Poll the health service from the moment the process starts; the statuses seen, in order."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    seen, deadline = [], time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                status = None                       # not listening yet
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return seen
            time.sleep(0.05)
    raise AssertionError(f"not SERVING after {timeout} s; saw {seen}")


def test_serve_starts_serves_and_stops_on_sigterm():
    from grpc_health.v1 import health_pb2

    from service.client import Client

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([*GRADSHARD, "serve", "--port", str(port), "--ray-cpus", "2", "--object-store-mb", "256",
                             "--metrics-port", str(metrics_port), "--log-format", "json"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "GRADSHARD_GRACE_S": "1"})
    try:
        seen = health_statuses_until_serving(f"127.0.0.1:{port}")
        # listening (NOT_SERVING) while Ray starts, then SERVING
        assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(timeout=90)
            job = client.create_job("logistic", shards=2, rows=16, features=4)
            assert client.evaluate(job.job_id).rows == 16
            list(client.step(job.job_id, 3))
        import urllib.request
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert f'gradshard_steps_total{{job_id="{job.job_id}"}} 3.0' in scraped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    messages = [e["message"] for e in lines if e["logger"].startswith("service.")]
    assert any(m.startswith("serving on 127.0.0.1") for m in messages) and "shutting down (grace 1.0 s)" in messages
    assert any(e.get("job_id") == job.job_id for e in lines)


def test_train_shows_progress_and_writes_parameters_and_a_plot(server, data_and_params):
    d = data_and_params[0]
    out, plot = d / "trained.npz", d / "loss.png"
    proc = run("train", "--server", server[0], "--model", "mlp", "--hidden", "6", "--data", str(d / "data.npz"),
               "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.01", "--schedule", "cosine",
               "--warmup", "5", "--clip-norm", "1.0", "--steps", "60", "--batch-size", "16", "--eval-every", "20",
               "--shards", "2", "--out", str(out), "--plot", str(plot))
    assert "60/60" in proc.stdout and "ex/s=" in proc.stdout            # the progress bar
    m = re.search(r"trained 60 steps: batch loss ([0-9.]+) -> ([0-9.]+), held-out loss ([0-9.]+)", proc.stdout)
    assert m, proc.stdout
    with np.load(out) as f:
        assert set(f.files) == {"W1", "b1", "W2", "b2"} and f["W1"].shape == (8, 6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_a_cosine_over_epochs_sizes_the_cosine_itself(server, data_and_params):
    d = data_and_params[0]
    proc = run("train", "--server", server[0], "--model", "mlp", "--hidden", "6", "--data", str(d / "data.npz"),
               "--schedule", "cosine", "--warmup", "2", "--epochs", "2", "--batch-size", "16", "--every", "1",
               "--shards", "2")
    # 60 rows, 12 held out, 48 train in batches of 16: 3 steps per epoch, 6 steps, cosine over 4
    assert "trained 6 steps" in proc.stdout, proc.stdout
    lrs = [float(x) for x in re.findall(r"lr ([0-9.e+-]+)", proc.stdout)]
    assert lrs[:2] == [0.0005, 0.001] and lrs[-1] < lrs[2] and len(lrs) == 6


def test_ctrl_c_stops_training_at_a_step_boundary(server, data_and_params):
    # The CLI catches the SIGINT while it waits for the next step, cancels the stream and says so.
    d = data_and_params[0]
    proc = subprocess.Popen([*GRADSHARD, "train", "--server", server[0], "--model", "mlp", "--hidden", "6", "--data",
                             str(d / "data.npz"), "--steps", "1000000", "--batch-size", "16", "--shards", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # whatever ours ignores
    try:
        seen, deadline = b"", time.monotonic() + 120
        while b"ex/s=" not in seen:             # the progress bar is running: steps are streaming
            assert time.monotonic() < deadline and select.select([proc.stdout], [], [], 5)[0], "no progress shown"
            more = os.read(proc.stdout.fileno(), 4096)
            assert more, f"train ended early: {proc.stderr.read().decode()}"
            seen += more
        proc.send_signal(signal.SIGINT)
        out, err = (b.decode() for b in proc.communicate(timeout=60))
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted: training stopped at a step boundary" in err
    steps = int(re.search(r"trained (\d+) steps", out).group(1))
    assert 1 <= steps < 1_000_000
