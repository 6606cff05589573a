"""Helpers for tests that kill processes (shard actors) and must know when they are gone."""
from __future__ import annotations

import os
import time


def wait_until_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Return once process `pid` no longer exists (ray.kill returns before it is gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} is still there after {timeout_s} s")
