"""serving/host_memory.py: when the CPU serving process keeps freed memory, and that it then does.

The policy is process-wide, so each measurement runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.helpers import REPO

from serving import host_memory

# Forty 1 MiB blocks made with the C library's malloc, written, freed, and again, five times; the
# page faults of each round. glibc's own policy maps the first blocks, then (its thresholds raised to
# about 1 MiB for mapping and 2 MiB for trimming) takes them from the heap and returns the freed
# 40 MiB at the heap's top to the kernel after every round, so every round faults its pages afresh.
REMAKE = """
import ctypes, json, resource, sys
from serving.host_memory import retain_freed_memory
message = retain_freed_memory() if sys.argv[1] == "policy" else "untouched"
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks, size, faults = [0] * 40, 1 << 20, []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(len(blocks)):
        blocks[i] = libc.malloc(size)
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "message": message}))
"""
PAGES = 40 * (1 << 20) // 4096  # the pages a round writes


def remake(mode: str, **env) -> dict:
    """REMAKE in a fresh interpreter, with glibc's settings from the environment removed and `env` added."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.SWITCH)} | env
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", REMAKE, mode], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.user_choice() is not None, reason="this process's allocator is not glibc's own")
def test_with_the_policy_remade_blocks_touch_no_fresh_pages():
    """The contract: memory freed and made again is the same memory, written without page faults,
    from the second round on. Bound: 2% of the pages a round writes (the interpreter's own
    allocations may fault a few). Without the policy the same rounds must fault (else the scenario
    tests nothing here)."""
    own = remake("untouched")
    if min(own["faults"][1:]) < 0.5 * PAGES:
        pytest.skip(f"this C library keeps freed blocks by itself here (faults per round {own['faults']})")
    got = remake("policy")
    assert got["message"].startswith("freed memory retained"), got
    assert max(got["faults"][1:]) <= 0.02 * PAGES, got


def test_the_users_choice_is_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "loaded_libraries", lambda: "")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.SWITCH, raising=False)
    assert host_memory.user_choice() is None

    monkeypatch.setenv(host_memory.SWITCH, "0")
    assert host_memory.user_choice() == f"{host_memory.SWITCH}=0"
    assert host_memory.retain_freed_memory() == f"left as it is: {host_memory.SWITCH}=0"
    monkeypatch.delenv(host_memory.SWITCH)

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert "GLIBC_TUNABLES" in host_memory.user_choice()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")  # no malloc setting: not a choice
    assert host_memory.user_choice() is None
    monkeypatch.delenv("GLIBC_TUNABLES")

    monkeypatch.setattr(host_memory, "loaded_libraries", lambda: "7f00-7f01 r-xp /usr/lib/libtcmalloc_minimal.so.4\n")
    assert host_memory.user_choice() == "another allocator is loaded"
    monkeypatch.setattr(host_memory, "loaded_libraries", lambda: "")

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.user_choice() == "the C library is not glibc"


def test_a_switched_off_policy_changes_nothing():
    got = remake("policy", **{host_memory.SWITCH: "0"})
    assert got["message"] == f"left as it is: {host_memory.SWITCH}=0"
