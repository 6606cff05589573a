"""TLS (certificates made here with openssl), optional client certificates, the bearer token,
and the rule against plaintext beyond loopback. A real server over the session's real Ray."""
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.auth import check_exposure
from service.client import Client
from service.coordinator import Coordinator
from service.server import create_server, server_credentials, set_serving

TOKEN = "s3cret-token"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=gradshard test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def start(pki, client_ca=""):
    coordinator = Coordinator()
    creds = server_credentials(str(pki / "server.pem"), str(pki / "server.key"), client_ca)
    server, port, health = create_server(coordinator, "127.0.0.1:0", credentials=creds, token=TOKEN)
    set_serving(health)
    return server, f"localhost:{port}", coordinator


@pytest.fixture(scope="module")
def tls_server(ray_local, pki):
    server, address, coordinator = start(pki)
    yield address
    server.stop(0)
    coordinator.close()


def test_tls_with_the_right_token_works(tls_server, pki):
    with Client(tls_server, timeout=60, token=TOKEN, tls_ca=str(pki / "ca.pem")) as client:
        job = client.create_job("linear", rows=10, features=3)
        assert client.get_job(job.job_id).n_params == 4
        assert [r.step for r in client.step(job.job_id, 2)] == [1, 2]    # streams carry the token too
        # and so do the calls that move tensors as raw messages (service/chunkwire.py)
        theta = client.get_params(job.job_id, flat=True)["flat"]
        assert client.set_params(job.job_id, {"flat": theta + 1}).step == 2
        np.testing.assert_array_equal(client.get_params(job.job_id, flat=True)["flat"], theta + 1)
        summary, grads = client.gradient(job.job_id, params={"flat": theta}, flat=True)
        assert summary.rows == 10 and grads["flat"].shape == (4,)
        client.delete_job(job.job_id)


@pytest.mark.parametrize("token,why", [("", "missing bearer token"), ("guess", "wrong bearer token")])
def test_a_missing_or_wrong_token_is_unauthenticated(tls_server, pki, token, why):
    with Client(tls_server, timeout=30, token=token, tls_ca=str(pki / "ca.pem")) as client:
        for call in (client.list_jobs, lambda: list(client.step("job-x", 1)), lambda: client.set_params("j", {}),
                     lambda: client.get_params("j"), lambda: client.gradient("j")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.value.details()


def test_health_checks_need_no_token(tls_server, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_server, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with Client(tls_server, timeout=10, token=TOKEN) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.list_jobs()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificates_when_the_server_requires_them(ray_local, pki):
    server, address, coordinator = start(pki, client_ca=str(pki / "ca.pem"))
    try:
        with Client(address, timeout=10, token=TOKEN, tls_ca=str(pki / "ca.pem")) as anonymous:
            with pytest.raises(grpc.RpcError) as e:
                anonymous.list_jobs()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(address, timeout=10, token=TOKEN, tls_ca=str(pki / "ca.pem"),
                    client_cert=str(pki / "client.pem"), client_key=str(pki / "client.key")) as known:
            assert known.list_jobs() == []
    finally:
        server.stop(0)
        coordinator.close()


@pytest.mark.parametrize("host,tls,insecure,refused", [
    ("127.0.0.1", False, False, False), ("localhost", False, False, False), ("::1", False, False, False),
    ("0.0.0.0", False, False, True), ("10.1.2.3", False, False, True), ("0.0.0.0", True, False, False),
    ("0.0.0.0", False, True, False)])
def test_plaintext_beyond_loopback_needs_insecure(host, tls, insecure, refused):
    if refused:
        with pytest.raises(ValueError, match="refusing to serve plaintext"):
            check_exposure(host, tls, insecure)
    else:
        check_exposure(host, tls, insecure)


def test_serve_refuses_plaintext_on_all_interfaces_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "refusing to serve plaintext on '0.0.0.0'" in proc.stderr
    assert "Started a local Ray" not in proc.stderr
