"""The learning journal: append-only JSON-lines files in STATE_DIR/learning/.

What a run learned must be visible after the fact (reports, plots) and while it runs, also
after a crash, without opening the ledgers the daemon holds. Each file is one record kind:
- labels.jsonl: each new label as the test of the version that scored it (prequential);
- scoring.jsonl: each scored chunk (version, round, scored, selected, by error kind);
- updates.jsonl: each update attempt (version or refusal, loss, new and replayed labels);
- heldout.jsonl: each version's held-out F1, when the daemon runs with a held-out set;
- status.jsonl: the process status at every status interval.
`append` never blocks its caller (the event loop): a writer thread owns the files. A crash
can tear the last line; readers skip lines that do not parse (`read`).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

KINDS = ("labels", "scoring", "updates", "heldout", "status")


class Journal:
    def __init__(self, state_dir: str | Path):
        self.directory = Path(state_dir) / "learning"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_forever, name="actprm-journal", daemon=True)
        self._writer.start()
        self.errors = 0

    def append(self, kind: str, record: dict) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown journal {kind!r}; choose from {', '.join(KINDS)}")
        self._queue.put((kind, {"at": time.time()} | record))

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._writer.join(timeout_s)

    def _write_forever(self) -> None:
        files: dict[str, object] = {}
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                kind, record = item
                try:
                    f = files.get(kind)
                    if f is None:
                        f = files[kind] = open(self.directory / f"{kind}.jsonl", "a", encoding="utf-8")
                    f.write(json.dumps(record, default=str) + "\n")
                    if self._queue.empty():
                        for g in files.values():
                            g.flush()
                except OSError:
                    self.errors += 1  # a full disk costs journal lines, never the daemon
        finally:
            for f in files.values():
                try:
                    f.close()
                except OSError:
                    pass


def read(state_dir: str | Path, kind: str) -> Iterator[dict]:
    """The records of one journal file, skipping lines that do not parse (a torn last line)."""
    path = Path(state_dir) / "learning" / f"{kind}.jsonl"
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record
