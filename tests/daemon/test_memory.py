"""daemon/memory.py on this machine's glibc: the fixed mmap threshold keeps large blocks out of
the heaps, where a dynamic one would let them in after the first large free."""

from __future__ import annotations

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
    libc.free(libc.malloc(24 << 20))  # a large block freed: glibc's dynamic threshold rises to its size
    before = libc.mallinfo2().hblks
    block = libc.malloc(6 << 20)  # an activation-sized block, above the fixed threshold
    mapped = libc.mallinfo2().hblks - before
    libc.free(block)
    print(mapped)
""")


@pytest.mark.skipif(memory._glibc() is None, reason="glibc only: elsewhere the allocator is left as it is")
def test_a_fixed_mmap_threshold_maps_large_blocks_even_after_a_larger_one_was_freed():
    def mapped(mode: str) -> int:
        # A fresh process each: mallopt changes the allocator of the whole process.
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                                  env={"PATH": "/usr/bin:/bin"})
        return int(out.stdout.strip())

    assert mapped("dynamic") == 0  # from the heap: where blocks of many sizes fragment it
    assert mapped("fixed") == 1  # its own mapping, returned to the system when freed
