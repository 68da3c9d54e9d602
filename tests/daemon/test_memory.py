"""daemon/memory.py: on glibc, the fixed mmap threshold keeps large blocks out of the heaps, where
a dynamic one would let them in after the first large free; and a process starts again on
jemalloc when the setting asks for it and the system has it."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from actprm.daemon import memory

PROBE = textwrap.dedent("""
    import ctypes, sys
    from actprm.daemon import memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "fixed":
        assert memory.fix_mmap_threshold()
    def mapped(size):
        before = libc.mallinfo2().hblks
        block = libc.malloc(size)
        n = libc.mallinfo2().hblks - before
        libc.free(block)
        return n
    # An activation-sized block (6 MB) in a fresh process, then one above glibc's 32 MB ceiling.
    print(mapped(6 << 20), mapped(40 << 20))
""")


@pytest.mark.skipif(memory._glibc() is None, reason="glibc only: elsewhere the allocator is left as it is")
def test_a_fixed_mmap_threshold_keeps_activation_sized_blocks_in_the_heap_from_the_start():
    def mapped(mode: str) -> list[int]:
        # A fresh process each: mallopt changes the allocator of the whole process.
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                                  env={"PATH": "/usr/bin:/bin"})
        return [int(x) for x in out.stdout.split()]

    # glibc's dynamic threshold starts at 128 KB: a block of a few MB gets a mapping of its own,
    # faulted in afresh each time (with the real backbone, most of a run's kernel time).
    assert mapped("dynamic") == [1, 1]
    assert mapped("fixed") == [0, 1]  # reused from the heap; only blocks from 32 MB up are mapped


# --- jemalloc ------------------------------------------------------------------------------------

JE = "libjemalloc.so.2"


def test_auto_takes_jemalloc_when_installed_and_glibc_preloads_nothing():
    assert memory.choose_allocator("auto", JE) == JE
    assert memory.choose_allocator("auto", None) is None
    assert memory.choose_allocator("glibc", JE) is None
    assert memory.choose_allocator("jemalloc", JE) == JE


def test_jemalloc_by_name_must_be_installed():
    with pytest.raises(memory.AllocatorError, match="apt install libjemalloc2"):
        memory.choose_allocator("jemalloc", None)
    with pytest.raises(ValueError, match="allocator must be"):
        memory.choose_allocator("tcmalloc", JE)


RESTART = textwrap.dedent("""
    import os, sys
    from actprm.daemon import memory
    memory.preload_allocator(sys.argv[1])
    memory.children_as_before()
    print(memory.loaded_allocator(), os.environ.get("LD_PRELOAD", "-"))
""")


def _run_on(setting: str, preload: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory.PRELOADED_ENV)}
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run([sys.executable, "-c", RESTART, setting], capture_output=True, text=True, check=True, env=env)
    return out.stdout.strip()


@pytest.mark.skipif(memory.jemalloc_library() is None, reason="jemalloc is not installed here (apt install libjemalloc2)")
def test_the_process_starts_again_on_jemalloc_unless_glibc_is_asked_for():
    assert _run_on("auto") == "jemalloc -"  # and what it starts gets no LD_PRELOAD of its own
    assert _run_on("jemalloc") == "jemalloc -"
    assert _run_on("glibc") == "glibc -"
    libc = ctypes.util.find_library("c")  # an operator's own preload (any library) is kept, and given back
    assert _run_on("auto", preload=libc) == f"jemalloc {libc}"


REUSE = textwrap.dedent("""
    import ctypes, resource, sys
    from actprm.daemon import memory
    memory.preload_allocator("jemalloc")  # starts again on jemalloc, with the daemon's MALLOC_CONF
    libc = ctypes.CDLL(None)  # malloc and free resolve to jemalloc's
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20  # a large block, like a head's weight gradient or an activation
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    held = rss_mb()
    purged = memory.trim()
    print(memory.loaded_allocator(), faults, round(held - rss_mb()), purged)
""")


@pytest.mark.skipif(memory.jemalloc_library() is None, reason="jemalloc is not installed here (apt install libjemalloc2)")
def test_on_jemalloc_freed_blocks_are_reused_until_trim_gives_them_back():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory.PRELOADED_ENV, "MALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True, env=env)
    allocator, faults, given_back_mb, purged = out.stdout.split()
    assert allocator == "jemalloc"
    pages = (16 << 20) // 4096
    # Reused, not faulted in again on every allocation: 40 x 4,096 pages if it were.
    assert int(faults) < 3 * pages, faults
    # ... and trim() (every TRIM_EVERY_S in the daemon) returns them to the system.
    assert purged == "True"
    assert int(given_back_mb) >= 12, given_back_mb
