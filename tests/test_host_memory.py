"""`release_freed_host_memory`: freed heap memory leaves resident memory (glibc only)."""

import subprocess
import sys

import pytest

# A fragmented heap: 400 blocks of 96 KiB (under glibc's 128 KiB mmap threshold, so they come
# from the heap), every other one freed, so no free block is at the heap's top and glibc's
# automatic trimming of the top cannot return them. Prints resident MiB before and after.
SCRIPT = """
import torch
from packrl.training.memory import release_freed_host_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

blocks = [torch.ones(96 * 1024, dtype=torch.uint8) for _ in range(400)]
del blocks[::2]
before = rss_mib()
released = release_freed_host_memory()
print(released, before, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_blocks_leave_resident_memory():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert released
    # 200 freed blocks of 96 KiB: 18.75 MiB; most of it must go (page edges may stay)
    assert before - after > 12, (before, after)
