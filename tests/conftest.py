"""Shared fixtures: one real local Ray per session, one real gRPC server per module."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # for `import reference`

# Ray reads RAY_AUTH_MODE at import; set it as the CLI does, before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray started by this test session, never a cluster someone else started."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_local):
    """A real gRPC server on a free loopback port with its coordinator; yields (address, coordinator)."""
    from service.coordinator import Coordinator
    from service.server import create_server, set_serving

    coordinator = Coordinator(call_timeout_s=300)
    grpc_server, port, health = create_server(coordinator, "127.0.0.1:0")
    set_serving(health)
    yield f"127.0.0.1:{port}", coordinator
    grpc_server.stop(0)
    coordinator.close()


@pytest.fixture(scope="module")
def client(server):
    from service.client import Client

    with Client(server[0], timeout=300) as c:
        yield c
