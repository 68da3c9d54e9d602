"""The daemon's native memory: glibc's allocator, bounded and given back.

glibc gives each thread that allocates its own arena (up to 8 x cores), and a freed block
inside an arena is kept for reuse, not returned to the system: a daemon whose threads (the
event loop, torch's, RocksDB's, the journal's, the swap and training pools) churn through
tensors and JSON keeps growing in RSS with no leak at all. Two arenas bound the first
(MALLOC_ARENA_MAX=2, set at start); a periodic malloc_trim(0) returns the free pages of every
arena. Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
ARENAS = 2

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


def trim() -> bool:
    """Return the allocator's free pages to the system; True when some were."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
