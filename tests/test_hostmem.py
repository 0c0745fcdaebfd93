"""training/hostmem.py: on glibc, freed CPU tensor memory stays in the heap for the next step to reuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A fresh process per mode (mallopt is process-wide and sticky): allocate a step's worth of 4 MiB buffers, free them,
# and read the program break (the top of glibc's main heap) before, in between and after.
PROBE = """
import ctypes, json, sys
import torch
from training.hostmem import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
start = libc.sbrk(0)
buffers = [torch.ones(2**20) for _ in range(16)]  # 16 x 4 MiB of fp32, touched
grown = libc.sbrk(0) - start
del buffers
kept = libc.sbrk(0) - start
print(json.dumps({"applied": applied, "grown_mib": grown / 2**20, "kept_mib": kept / 2**20}))
"""


def probe(mode: str) -> dict:
    # glibc's own defaults: no preloaded allocator, no MALLOC_* tuning inherited from the caller
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_serves_buffers_from_the_heap_and_keeps_them():
    plain, tuned = probe("plain"), probe("tuned")
    # glibc's defaults: a 4 MiB request is above the initial 128 KiB mmap threshold, so it gets fresh pages from
    # mmap (the heap does not move), and freeing it unmaps them: the next step faults them in again
    assert plain["applied"] is None and plain["grown_mib"] < 4, plain
    # tuned: the buffers come from the heap and stay there once freed, ready for the next step
    assert tuned["applied"] is True
    assert tuned["grown_mib"] >= 60 and tuned["kept_mib"] == tuned["grown_mib"], tuned


@pytest.mark.parametrize("var", ["LD_PRELOAD", "MALLOC_ARENA_MAX"])
def test_a_preloaded_allocator_or_hand_tuned_malloc_is_left_alone(var, monkeypatch):
    from training.hostmem import keep_freed_memory

    monkeypatch.setenv(var, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2" if var == "LD_PRELOAD" else "2")
    assert keep_freed_memory() is False
