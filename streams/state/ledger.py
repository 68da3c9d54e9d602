"""Durable local state in rocksdict: which ids were scored, judged, trained, and round state.

Dedupe keys (scored, admitted, judged, trained) are kept for a retention (default 7 days,
Kafka's default topic retention) in whole time buckets, so the ledger's size follows the rate
times the retention, not the run's age, and expiry is a range delete per bucket.

Kept in our own store rather than faust tables because changelog recovery from the embedded
broker can restore wrong state (see the broker notes). Raw mode: keys and values are bytes,
values are JSON, so nothing is ever unpickled. Several writes that must land together go in
one ``transaction()`` (a RocksDB write batch).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict, WriteBatch

# Namespaces; a key is b"<namespace>/<id>", or b"<namespace>@<bucket>/<id>" in an expiring one.
SCORED = "scored"  # trajectory id -> {"version", "epoch", "at": [partition, offset], "reward"} (streams/roles/scoring.py)
ADMITTED = "admitted"  # trajectory id -> round id it was sent to the judge in
JUDGED = "judged"  # trajectory id -> {"first_error"} or {"dead": reason}
PENDING = "pending"  # label id -> the Label, received but not yet trained on
TRAINED = "trained"  # label id -> model version that consumed it (None: refused batch)
CANARY = "canary"  # label id -> the Label, held back from training to check each update
VALIDATED = "validated"  # label id -> the consolidation version (None: refused) a slice label judged; it trains since
META = "meta"  # small singletons: round state, counters

# Dedupe keys, one per trajectory or label: they expire after the retention. The others (pending
# labels, the canary, round state) are working state, small, and kept until their owner removes them.
EXPIRING = frozenset({SCORED, ADMITTED, JUDGED, TRAINED})
# Kafka's default log retention (retention.ms = 7 days): a redelivery cannot be older than the
# data it redelivers, so a dedupe key older than the topics' retention guards nothing.
DEFAULT_RETENTION_S = 7 * 24 * 3600.0
BUCKETS = 7  # a retention spans this many buckets: a get checks BUCKETS + 1 keys (one multi-get)
_LEGACY_DROP_AT = "ledger_legacy_drop_at"  # META: when unbucketed keys of an older layout go

# RocksDB's memory: memtables and the block cache bounded here; the table readers' index and
# bloom-filter blocks (about 1.5 bytes a key) follow the data, which the retention bounds
# (rate x retention keys). Not in the block cache: a compacted file's filter outgrows a cache
# shard and would be read again on every lookup (measured: 750 us a get instead of 1 us).
# 8 MB memtables and an 8 MB cache (were 16 and 32): the daemon's RSS goal is +5% (~35 MB) after
# the warm-up, and memtables filling and a cache warming over the first half hour took most of it. A
# new id (the common lookup) is answered by the bloom filter; the cache only serves hits.
WRITE_BUFFER_BYTES = 8 << 20  # per memtable; at most MAX_WRITE_BUFFERS of them
MAX_WRITE_BUFFERS = 2
ARENA_BLOCK_BYTES = 4 << 20
BLOCK_CACHE_BYTES = 8 << 20
MAX_OPEN_FILES = 256


def bounded_options() -> Options:
    opt = Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.set_write_buffer_size(WRITE_BUFFER_BYTES)
    opt.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
    opt.set_db_write_buffer_size(MAX_WRITE_BUFFERS * WRITE_BUFFER_BYTES)
    # A memtable's memory comes in arena blocks (default: an eighth of it, 2 MB); at the daemon's
    # mmap threshold (daemon/memory.py) each block is a mapping of its own, given back to the
    # system when the memtable is flushed instead of left as holes in the heap.
    opt.set_arena_block_size(ARENA_BLOCK_BYTES)
    opt.set_max_open_files(MAX_OPEN_FILES)
    # Disk: a scored key keeps its reward (~300 B of JSON); zstd where most data settles holds it
    # in ~77 B against ~123 B with the default (measured on 100k rewards), lz4 above it for speed.
    opt.set_compression_type(DBCompressionType.lz4())
    opt.set_bottommost_compression_type(DBCompressionType.zstd())
    table = BlockBasedOptions()
    table.set_block_cache(Cache(BLOCK_CACHE_BYTES))
    table.set_bloom_filter(10, False)  # a miss (a new id, the common case) rarely reads a block
    opt.set_block_based_table_factory(table)
    return opt


class Ledger:
    """`retention_s`: how long a key of an EXPIRING namespace is kept, at least (at most one
    bucket, retention_s / BUCKETS, longer); None keeps every key forever. Keys are written
    into the bucket of their write time and a whole bucket is dropped with one range delete
    once it is older than the retention, so expiry never scans keys. `clock` is for tests."""

    def __init__(self, path: str | Path, retention_s: float | None = DEFAULT_RETENTION_S,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), options=bounded_options())
        self._local = threading.local()  # a transaction belongs to the thread that opened it
        self.retention_s, self._clock = retention_s, clock
        self.bucket_s = retention_s / BUCKETS if retention_s else None
        self._expired_through: int | None = None  # the bucket that was current at the last drop
        self._compactor: threading.Thread | None = None
        if self.bucket_s is not None:
            if self._db.get(self._key(META, _LEGACY_DROP_AT)) is None:
                self._db[self._key(META, _LEGACY_DROP_AT)] = json.dumps(clock() + retention_s).encode()
            self.expire()

    @staticmethod
    def _key(ns: str, key: str) -> bytes:
        return f"{ns}/{key}".encode()

    # --- buckets -------------------------------------------------------------------------

    def _bucket(self, now: float | None = None) -> int:
        return int((self._clock() if now is None else now) // self.bucket_s)

    @staticmethod
    def _bucket_prefix(ns: str, bucket: int) -> bytes:
        return f"{ns}@{bucket:012d}/".encode()

    def _live(self, ns: str) -> list[bytes]:
        """Key prefixes a lookup in `ns` checks, newest first; the last is the unbucketed one."""
        if self.bucket_s is None or ns not in EXPIRING:
            return [f"{ns}/".encode()]
        now = self._bucket()
        return [self._bucket_prefix(ns, b) for b in range(now, now - BUCKETS - 1, -1)] + [f"{ns}/".encode()]

    def expire(self, now: float | None = None, wait: bool = True) -> int:
        """Drop every bucket older than the retention (and, one retention after the first open,
        an older layout's unbucketed keys); returns the number of key ranges dropped. The keys
        are gone at once (a range tombstone); the disk space comes back with a compaction of
        those ranges, in the background unless `wait`."""
        if self.bucket_s is None:
            return 0
        now = self._clock() if now is None else now
        first_live = self._bucket(now) - BUCKETS
        drop_legacy = json.loads(self._db.get(self._key(META, _LEGACY_DROP_AT)) or b"0") <= now
        ranges = []
        for ns in sorted(EXPIRING):
            ranges.append((f"{ns}@".encode(), self._bucket_prefix(ns, first_live)))
            if drop_legacy:
                ranges.append((f"{ns}/".encode(), f"{ns}0".encode()))  # "0" follows "/" in ASCII
        for lo, hi in ranges:
            self._db.delete_range(lo, hi)
        self._expired_through = self._bucket(now)
        # Keys only grow with time, so nothing new lands in a dropped range and no ordinary
        # compaction would ever rewrite its files: compact them now, or the space never returns.
        if wait:
            self._compact(ranges)
        elif self._compactor is None or not self._compactor.is_alive():
            self._compactor = threading.Thread(target=self._compact, args=(ranges,), name="actprm-ledger-compact", daemon=True)
            self._compactor.start()
        return len(ranges)

    def _compact(self, ranges: list[tuple[bytes, bytes]]) -> None:
        for lo, hi in ranges:
            self._db.compact_range(lo, hi)

    def _maybe_expire(self) -> None:
        if self.bucket_s is not None and self._bucket() != self._expired_through:
            self.expire(wait=False)  # once a bucket (a day), from whichever write crosses into it

    def _raw(self, ns: str, key: str) -> bytes | None:
        prefixes = self._live(ns)
        if len(prefixes) == 1:
            return self._db.get(prefixes[0] + key.encode())
        # One multi-get over the live buckets; the newest holding the key wins.
        return next((v for v in self._db.get([p + key.encode() for p in prefixes]) if v is not None), None)

    def get(self, ns: str, key: str, default: Any = None) -> Any:
        raw = self._raw(ns, key)
        return default if raw is None else json.loads(raw)

    def has(self, ns: str, key: str) -> bool:
        return self._raw(ns, key) is not None  # a stored null (a label trained by no version) counts

    @property
    def _batch(self) -> WriteBatch | None:
        return getattr(self._local, "batch", None)

    def put(self, ns: str, key: str, value: Any) -> None:
        self._maybe_expire()
        raw = json.dumps(value).encode()
        full = self._live(ns)[0] + key.encode()  # an expiring namespace: the current bucket
        if self._batch is not None:
            self._batch.put(full, raw)
        else:
            self._db[full] = raw

    def delete(self, ns: str, key: str) -> None:
        batch = self._batch if self._batch is not None else WriteBatch(raw_mode=True)
        for prefix in self._live(ns):
            batch.delete(prefix + key.encode())
        if batch is not self._batch:
            self._db.write(batch)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes inside land together or not at all (reads inside see the old state)."""
        if self._batch is not None:
            yield
            return
        self._local.batch = WriteBatch(raw_mode=True)
        try:
            yield
            self._db.write(self._local.batch)
        finally:
            self._local.batch = None

    def items(self, ns: str) -> Iterator[tuple[str, Any]]:
        """Every live key of `ns` with its value (in an expiring namespace, the newest write of a
        key; reading one costs memory for its seen ids, so keep it for small namespaces)."""
        prefixes = self._live(ns)
        seen: set[bytes] | None = set() if len(prefixes) > 1 else None
        for prefix in prefixes:
            for k, v in self._db.items(from_key=prefix):
                if not k.startswith(prefix):
                    break
                key = k[len(prefix):]
                if seen is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                yield key.decode(), json.loads(v)

    def count(self, ns: str) -> int:
        return sum(1 for _ in self.items(ns))

    def flush(self) -> None:
        self._db.flush()

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor.join()  # a compaction of dropped buckets finishes before the store closes
        self._db.close()


def mark_trained(ledger: Ledger, label_ids, version: int | None) -> None:
    """Labels leave the pending set for good: trained by `version`, or retired with None (a
    refused batch, a label refused alone, a round closed by reset-round). Inside an open
    transaction these writes join it; otherwise they land together."""
    with ledger.transaction():
        for label_id in label_ids:
            ledger.put(TRAINED, label_id, version)
            ledger.delete(PENDING, label_id)
