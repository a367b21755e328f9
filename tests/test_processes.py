"""Process helpers: keeping freed memory for reuse (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import os, sys
from medbridge import processes
if sys.argv[1] == "tuned":
    assert processes.keep_freed_memory() and processes.keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page
chunks = [bytearray(1 << 20) for _ in range(96)]
full = rss()
del chunks
print(full - rss())
"""


def _freed_returned(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_buffers_stay_with_the_process_once_tuned() -> None:
    if "glibc" not in " ".join(__import__("platform").libc_ver()):
        pytest.skip("malloc tuning applies to glibc only")
    assert _freed_returned("default") > 64 << 20, "by default glibc returns 1 MiB buffers to the kernel at once"
    assert _freed_returned("tuned") < 16 << 20, "tuned, the freed buffers are kept for the next reads"
