"""The learning journal: append-only JSON-lines files in STATE_DIR/learning/.

What a run learned must be visible after the fact (reports, plots) and while it runs, also
after a crash, without opening the ledgers the daemon holds. Each file is one record kind:
- labels.jsonl: each new label as the test of the version that scored it (prequential);
- scoring.jsonl: each scored chunk (version, round, scored, selected, by error kind);
- updates.jsonl: each update attempt (version or refusal, loss, new and replayed labels);
- heldout.jsonl: each version's held-out F1, when the daemon runs with a held-out set;
- status.jsonl: the process status when it changed (else every few minutes).
Each kind rotates by size and age into KIND.NNNNNN.jsonl, the oldest beyond `keep` removed;
`journal_files` lists a kind's set, oldest first, for readers (`read`, `actprm report`).
`append` never blocks its caller (the event loop): a writer thread owns the files. A crash
can tear the last line; readers skip lines that do not parse (`read`).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

KINDS = ("labels", "scoring", "updates", "heldout", "status")
# Rotation: the active file KIND.jsonl is renamed KIND.NNNNNN.jsonl once it holds max_bytes or has
# been written for max_age_s, and only the newest `keep` rotated files of a kind stay, so a
# kind's files hold at most (keep + 1) x max_bytes at any age of the run.
MAX_BYTES = 32 << 20
MAX_AGE_S = 24 * 3600.0
KEEP = 14
STATUS_HEARTBEAT_S = 300.0  # an unchanged status is journalled this often (a sign of life), not every interval
_ROTATED = re.compile(r"^(?P<kind>[a-z]+)\.(?P<seq>\d{6,})\.jsonl$")


def journal_files(directory: str | Path, kind: str) -> list[Path]:
    """A kind's files, oldest first: the rotated ones by sequence number, then the active one."""
    directory = Path(directory)
    rotated = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _ROTATED.match(p.name)
            if m and m["kind"] == kind:
                rotated.append((int(m["seq"]), p))
    active = directory / f"{kind}.jsonl"
    return [p for _, p in sorted(rotated)] + ([active] if active.is_file() else [])


class _Files:
    """The open files of the writer thread, rotated by size and age (a plain object: tests
    drive it with an injected clock)."""

    def __init__(self, directory: Path, max_bytes: int, max_age_s: float, keep: int, clock: Callable[[], float]):
        self.directory, self.max_bytes, self.max_age_s, self.keep, self.clock = directory, max_bytes, max_age_s, keep, clock
        self.open: dict[str, tuple[object, float]] = {}  # kind -> (file, when it was opened)

    def write(self, kind: str, line: str) -> None:
        f, since = self.open.get(kind, (None, 0.0))
        if f is not None and (f.tell() >= self.max_bytes or self.clock() - since >= self.max_age_s):
            self.rotate(kind)
            f = None
        if f is None:
            f = open(self.directory / f"{kind}.jsonl", "a", encoding="utf-8")
            self.open[kind] = (f, self.clock())
        f.write(line)

    def rotate(self, kind: str) -> None:
        f, _ = self.open.pop(kind)
        f.close()
        rotated = [p for p in journal_files(self.directory, kind) if p.name != f"{kind}.jsonl"]
        seq = int(_ROTATED.match(rotated[-1].name)["seq"]) + 1 if rotated else 1
        (self.directory / f"{kind}.jsonl").rename(self.directory / f"{kind}.{seq:06d}.jsonl")
        for old in rotated[: max(0, len(rotated) + 1 - self.keep)]:
            old.unlink(missing_ok=True)

    def flush(self) -> None:
        for f, _ in self.open.values():
            f.flush()

    def close(self) -> None:
        for f, _ in self.open.values():
            try:
                f.close()
            except OSError:
                pass
        self.open.clear()


class Journal:
    def __init__(self, state_dir: str | Path, max_bytes: int = MAX_BYTES, max_age_s: float = MAX_AGE_S, keep: int = KEEP,
                 clock: Callable[[], float] = time.time):
        self.directory = Path(state_dir) / "learning"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._files = _Files(self.directory, max_bytes, max_age_s, keep, clock)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_forever, name="actprm-journal", daemon=True)
        self._writer.start()
        self.errors = 0
        self._last: dict[str, tuple[str, float]] = {}  # kind -> (the last record changed-checked, when written)

    def append(self, kind: str, record: dict) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown journal {kind!r}; choose from {', '.join(KINDS)}")
        self._queue.put((kind, {"at": self.clock()} | record))

    def append_if_changed(self, kind: str, record: dict, heartbeat_s: float = STATUS_HEARTBEAT_S,
                          ignore: tuple[str, ...] = ("uptime_s", "busy_s")) -> bool:
        """Append unless the record equals the last one appended this way (`ignore`d keys aside)
        and that one is younger than `heartbeat_s`: an idle daemon's status costs a line every
        few minutes, not every interval. Returns whether it was appended."""
        key = json.dumps({k: v for k, v in record.items() if k not in ignore}, sort_keys=True, default=str)
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and last[0] == key and now - last[1] < heartbeat_s:
            return False
        self._last[kind] = (key, now)
        self.append(kind, record)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._writer.join(timeout_s)

    def _write_forever(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                kind, record = item
                try:
                    self._files.write(kind, json.dumps(record, default=str) + "\n")
                    if self._queue.empty():
                        self._files.flush()
                except OSError:
                    self.errors += 1  # a full disk costs journal lines, never the daemon
        finally:
            self._files.close()


def read(state_dir: str | Path, kind: str) -> Iterator[dict]:
    """The records of one kind over its rotated files, oldest first, skipping lines that do not
    parse (a torn last line)."""
    for path in journal_files(Path(state_dir) / "learning", kind):
        try:
            f = open(path, encoding="utf-8")
        except FileNotFoundError:  # rotated away while reading
            continue
        with f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
