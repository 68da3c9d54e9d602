"""The daemon's native memory: the allocator it runs on, bounded and given back.

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
in use grew by 45 MB. A fixed threshold (MALLOC_MMAP_THRESHOLD_ set by the operator wins)
keeps such blocks out of the heaps. It is 32 MB, glibc's own ceiling: at 4 MB the real backbone
(SmolLM2-135M) and the heads' training blocks of 4-32 MB were each faulted in afresh, so the
demo on glibc took 6 min 45 s with 2 min 6 s of CPU in the kernel, and a consolidation made 322
optimizer steps in 30 s; at 32 MB, 5 min 56 s, 55 s in the kernel, and 708 steps. Two 12-minute
soaks (tiny backbone) grew alike (+9.7% at 32 MB, +10.6% at 4 MB) and scored 51.4/s against
44.7/s (2026-12-06, no jemalloc on the machine; docs/operations.md).

Fragmentation is glibc's own, though: with the threshold fixed, the bytes in use levelled off
from minute 4 of a 30-minute soak while glibc's free bytes kept growing (110 -> 287 MB), with
two arenas and with one. Minutes 4-12 of 12-minute soaks (tiny backbone, 90/s): RSS +8.2% on
glibc with one arena, +8.6% on mimalloc, +3.1% on jemalloc, which also scored 7% faster. So the
daemon runs on jemalloc where the system has it (`allocator` setting, `preload_allocator`):
LD_PRELOAD is read only when a process starts, so `actprm run` starts itself again with it,
before it has loaded anything large. The glibc settings above stay for where it is missing.

jemalloc's own decay is off (JEMALLOC_CONF): with it, every large tensor freed and allocated again
was faulted in afresh, so that a quarter of the daemon's CPU went to the kernel. Its free pages go
back to the system when trim() purges every arena, every TRIM_EVERY_S.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_ARENA_MAX = -8  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
ARENAS = 2
MMAP_THRESHOLD = 32 << 20  # blocks from this size up get their own mapping, returned when freed
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
    """Return the allocator's free pages to the system: every jemalloc arena's (JEMALLOC_CONF
    says why jemalloc only does it here), or glibc's malloc_trim. True when it ran."""
    mallctl = _jemalloc_mallctl()
    if mallctl is not None:
        return mallctl(f"arena.{MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0) == 0
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


# --- jemalloc ----------------------------------------------------------------------------------

PRELOADED_ENV = "ACTPRM_ALLOCATOR_PRELOADED"  # set on the restart, so a failed preload is not retried
BEFORE_ENV = "ACTPRM_LD_PRELOAD_BEFORE"  # the operator's LD_PRELOAD, given back to the processes it starts
# dirty_decay_ms:-1: jemalloc never purges freed pages on its own (neither from its background thread
# nor on later allocations), only when trim() asks (every TRIM_EVERY_S). Measured on
# jemalloc 5.3 (2 cores, a consolidation's 176 steps of 32 heads on cached features): with decay on,
# at any decay time (10 s, the default, up to 1,000 s), 4.4 million page faults, 8.2 s of system
# CPU and 10.0 s wall; with it off, 4,300 faults, 0.3 s and 5.2 s. In the demo the daemon spent
# 2 min 52 s of its 11 min 30 s of CPU in the kernel.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:-1"
MALLCTL_ARENAS_ALL = 4096  # jemalloc's "every arena" index in mallctl names
_mallctl = None


class AllocatorError(RuntimeError):
    """jemalloc was asked for by name and is not installed."""


def _jemalloc_mallctl():
    """jemalloc's mallctl when this process runs on it, else None."""
    global _mallctl
    if _mallctl is None:
        try:
            fn = ctypes.CDLL(None).mallctl  # only jemalloc exports it
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _mallctl = fn
        except (OSError, AttributeError):
            _mallctl = False
    return _mallctl or None


def jemalloc_library() -> str | None:
    """The system's jemalloc as a name the dynamic loader resolves (libjemalloc.so.2), or None."""
    return ctypes.util.find_library("jemalloc") if sys.platform == "linux" else None


def choose_allocator(setting: str, jemalloc: str | None) -> str | None:
    """The library to preload for the `allocator` setting, given the system's jemalloc (None:
    not installed): auto takes it when there is one; jemalloc must be installed; glibc none."""
    if setting == "glibc" or (setting == "auto" and jemalloc is None):
        return None
    if setting not in ("auto", "jemalloc"):
        raise ValueError(f"allocator must be auto, jemalloc or glibc, got {setting!r}")
    if jemalloc is None:
        raise AllocatorError('allocator jemalloc is not installed (apt install libjemalloc2), or set allocator = "auto"')
    return jemalloc


def loaded_allocator() -> str:
    """The allocator this process runs on: jemalloc when it is mapped in, else glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def preload_allocator(setting: str) -> None:
    """Start this process again on jemalloc when the setting asks for it, unless it already
    runs on it (or a restart for it already happened). Returns only when nothing is to be done."""
    if sys.platform != "linux" or os.environ.get(PRELOADED_ENV) or loaded_allocator() != "glibc":
        return
    library = choose_allocator(setting, jemalloc_library())
    if library is None:
        return
    before = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [library, before])),
               MALLOC_CONF=os.environ.get("MALLOC_CONF", JEMALLOC_CONF), **{PRELOADED_ENV: "jemalloc", BEFORE_ENV: before})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def children_as_before() -> None:
    """The processes this one starts (the embedded broker, a judge's server) get the LD_PRELOAD
    the operator gave, not the one this process started again with."""
    if PRELOADED_ENV in os.environ and BEFORE_ENV in os.environ:
        before = os.environ.pop(BEFORE_ENV)
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
