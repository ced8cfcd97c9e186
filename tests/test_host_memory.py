"""ddpm_hf/util/host_memory.py: on glibc, freed large blocks stay in the process for reuse (no page
faults per training step), unless the user chose otherwise. Each case runs in a fresh process:
the policy is process-wide (the commands set it at their start: tests/test_process_settings.py)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a policy of glibc's malloc (Linux)")
requires_mallinfo2 = pytest.mark.skipif(
    not (os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0.0").startswith("glibc")
    or tuple(map(int, os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])) < (2, 33),
    reason="glibc's mallinfo2 (glibc >= 2.33) reports where a block came from",
)

# Allocates and frees a 64 MiB block 20 times, as a training step does with its activations, after
# 10 times of warm-up (the heap settles: a small block may land above a freed large one at first).
# glibc's own books (mallinfo2) say where the block came from: `hblkhd` counts bytes in blocks
# mmapped on their own (handed back at free), `arena` the heap that keeps freed memory for reuse.
# Page faults alone do not tell: with transparent huge pages a fresh mapping faults once per 2 MiB.
CHURN = """
import ctypes, json, resource
import torch
from ddpm_hf.util.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
chosen = keep_freed_memory()
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = torch.empty(16 << 20).fill_(1.0)
    alive = libc.mallinfo2()
    del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
freed = libc.mallinfo2()
print(json.dumps(dict(chosen=chosen, page_faults=faults, mmapped_while_alive=alive.hblkhd,
                      mmapped_after_free=freed.hblkhd, heap_after_free=freed.arena)))
"""


def without_allocator_settings() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DDPM_HF_KEEP_FREED_MEMORY"}


def churn(**env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHURN],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**without_allocator_settings(), **env},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@requires_mallinfo2
def test_kept_blocks_are_reused_without_page_faults():
    kept, default = churn(), churn(DDPM_HF_KEEP_FREED_MEMORY="0")
    assert kept["chosen"].startswith("host memory: freed blocks up to") and default["chosen"] is None
    block = 64 << 20
    # glibc's default serves the 64 MiB block with its own mmap and unmaps it when freed ...
    assert default["mmapped_while_alive"] >= block and default["mmapped_after_free"] < block
    # ... the policy serves it from the heap and keeps it there after the free, for the next step,
    assert kept["mmapped_while_alive"] < block and kept["heap_after_free"] >= block
    # so reusing it costs no page faults: not even one block's 16,384 pages over the 20 times.
    assert kept["page_faults"] < 16384


def test_the_users_own_malloc_settings_win():
    assert churn(MALLOC_MMAP_THRESHOLD_="131072")["chosen"] is None


def test_nothing_is_set_for_a_gpu_run():
    script = "from ddpm_hf.util.host_memory import keep_freed_memory; print(keep_freed_memory('cuda:0'))"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=without_allocator_settings(),
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr[-2000:]
