"""Durable local state in rocksdict: which ids were scored, judged, trained, and round state.

Kept in our own store rather than faust tables because changelog recovery from the embedded
broker can restore wrong state (see the broker notes). Raw mode: keys and values are bytes,
values are JSON, so nothing is ever unpickled. Several writes that must land together go in
one ``transaction()`` (a RocksDB write batch).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict, WriteBatch

# Namespaces; a key is b"<namespace>/<id>".
SCORED = "scored"  # trajectory id -> {"version" that scored it, "epoch" of the broker data it was sent in}
ADMITTED = "admitted"  # trajectory id -> round id it was sent to the judge in
JUDGED = "judged"  # trajectory id -> {"first_error"} or {"dead": reason}
PENDING = "pending"  # label id -> the Label, received but not yet trained on
TRAINED = "trained"  # label id -> model version that consumed it (None: refused batch)
CANARY = "canary"  # label id -> the Label, held back from training to check each update
META = "meta"  # small singletons: round state, counters


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), options=Options(raw_mode=True))
        self._local = threading.local()  # a transaction belongs to the thread that opened it

    @staticmethod
    def _key(ns: str, key: str) -> bytes:
        return f"{ns}/{key}".encode()

    def get(self, ns: str, key: str, default: Any = None) -> Any:
        raw = self._db.get(self._key(ns, key))
        return default if raw is None else json.loads(raw)

    def has(self, ns: str, key: str) -> bool:
        return self._db.get(self._key(ns, key)) is not None

    @property
    def _batch(self) -> WriteBatch | None:
        return getattr(self._local, "batch", None)

    def put(self, ns: str, key: str, value: Any) -> None:
        raw = json.dumps(value).encode()
        if self._batch is not None:
            self._batch.put(self._key(ns, key), raw)
        else:
            self._db[self._key(ns, key)] = raw

    def delete(self, ns: str, key: str) -> None:
        if self._batch is not None:
            self._batch.delete(self._key(ns, key))
        else:
            del self._db[self._key(ns, key)]

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
        prefix = f"{ns}/".encode()
        for k, v in self._db.items(from_key=prefix):
            if not k.startswith(prefix):
                break
            yield k[len(prefix):].decode(), json.loads(v)

    def count(self, ns: str) -> int:
        return sum(1 for _ in self.items(ns))

    def flush(self) -> None:
        self._db.flush()

    def close(self) -> None:
        self._db.close()


def mark_trained(ledger: Ledger, label_ids, version: int | None) -> None:
    """Labels leave the pending set for good: trained by `version`, or retired with None (a
    refused batch, a label refused alone, a round closed by reset-round). Inside an open
    transaction these writes join it; otherwise they land together."""
    with ledger.transaction():
        for label_id in label_ids:
            ledger.put(TRAINED, label_id, version)
            ledger.delete(PENDING, label_id)
