"""workers.memory: a process that keeps freed memory reuses its pages instead of faulting new ones."""
import json
import os
import platform
import subprocess
import sys

import pytest

from workers.memory import keep_freed_memory, operator_settings

# Allocate, touch and free the buffers of a million-parameter step twenty times; count the
# page faults (minor faults: no disk involved) the loop took.
PROBE = r"""
import json, resource, sys
import numpy as np
from workers.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    a = np.ones(1 << 20, np.float32)      # a 4 MB gradient and its four 1 MiB messages
    raw = memoryview(a).cast("B")
    chunks = [b"".join([raw[i: i + (1 << 20)]]) for i in range(0, 4 << 20, 1 << 20)]
    del a, chunks
step()                                    # warm-up: the heap grows once
before = faults()
for _ in range(20):
    step()
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""


def _faults(mode: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_kept_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                             "GLIBC_TUNABLES")}
    default, kept = _faults("default", env), _faults("keep", env)
    assert kept["kept"] is True
    # 20 rounds of 8 MB: about 2,000 pages each round by default, none once the pages are kept
    assert default["faults"] > 20 * 1000
    assert kept["faults"] < default["faults"] / 20


def test_an_operators_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")      # another setting: ours still apply
    assert not operator_settings()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0")
    assert operator_settings() and keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert operator_settings() and keep_freed_memory() is False
