"""The daemon's native memory: glibc's allocator, bounded and given back.

glibc gives each thread that allocates its own arena (up to 8 x cores), and a freed block
inside an arena is kept for reuse, not returned to the system: a daemon whose threads (the
event loop, torch's, RocksDB's, the journal's, the swap and training pools) churn through
tensors and JSON keeps growing in RSS with no leak at all. Two arenas bound the first
(MALLOC_ARENA_MAX=2, set at start); a malloc_trim(0) every TRIM_EVERY_S returns the free pages of every
arena. Elsewhere than glibc these are no-ops.

What trimming cannot return is a heap fragmented by blocks of many sizes: glibc serves a block
above its mmap threshold with its own mapping (given back when freed), but the threshold is
dynamic, raised to the size of every such block freed (up to 32 MB). Activations whose size
follows each batch's padded length then come from the heaps instead, and the heaps grow with
the mix of sizes: measured in a 5-minute soak (tiny backbone), 160 MB of the daemon's 640 MB
anonymous RSS was free memory inside the heaps (mallinfo2 fordblks), growing while the memory
in use grew by 45 MB. A fixed threshold of 4 MB (MALLOC_MMAP_THRESHOLD_ set by the operator
wins) keeps such blocks out of the heaps; scoring with the tiny backbone measured the same
speed within noise (1 MB and 256 KB cost ~25%: every smaller tensor then faults in fresh pages).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
ARENAS = 2
MMAP_THRESHOLD = 4 << 20  # blocks from this size up get their own mapping, returned when freed
# malloc_trim(0) takes ~1 ms on the daemon's heaps (measured): often enough that what a few seconds
# of scoring and training free is not kept resident until the next minute.
TRIM_EVERY_S = 10.0

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.malloc_trim  # glibc only
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def bound_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas for threads started from now on (MALLOC_ARENA_MAX)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas))


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Blocks of `threshold` bytes and more are mapped on their own, always (no dynamic raise)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim() -> bool:
    """Return the allocator's free pages to the system; True when some were."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
