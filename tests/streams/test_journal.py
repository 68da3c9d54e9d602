"""The learning journal rotates by size and age, keeps a bounded set, and readers see it whole."""

from __future__ import annotations

import json

from actprm.streams.state import journal
from actprm.streams.state.journal import Journal, _Files, journal_files


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_rotation_by_size_keeps_the_newest_files_and_reads_in_order(tmp_path):
    learning = tmp_path / "learning"
    learning.mkdir()
    files = _Files(learning, max_bytes=50, max_age_s=1e9, keep=3, clock=Clock())
    for i in range(40):  # ~10 bytes a line: a new file every 5 lines or so
        files.write("labels", json.dumps({"i": i}) + "\n")
    files.close()
    names = [p.name for p in journal_files(learning, "labels")]
    assert len(names) == 4 and names[-1] == "labels.jsonl"  # 3 rotated + the active one
    seqs = [int(n.split(".")[1]) for n in names[:-1]]
    assert seqs == sorted(seqs) and seqs[0] > 1  # the oldest were removed
    got = [r["i"] for r in journal.read(tmp_path, "labels")]
    assert got == list(range(got[0], 40)) and got[0] > 0  # in order, the oldest dropped whole
    assert all(p.stat().st_size <= 50 + 10 for p in learning.iterdir())


def test_rotation_by_age(tmp_path):
    clock = Clock()
    files = _Files(tmp_path, max_bytes=1 << 30, max_age_s=3600, keep=10, clock=clock)
    for hour in range(5):
        files.write("status", '{"a": 1}\n')
        clock.t += 1800
        files.write("status", '{"a": 2}\n')
        clock.t += 1800
    files.close()
    names = [p.name for p in journal_files(tmp_path, "status")]
    assert names == [f"status.{i:06d}.jsonl" for i in range(1, 5)] + ["status.jsonl"]
    assert all(p.read_text().count("\n") == 2 for p in journal_files(tmp_path, "status"))


def test_an_unchanged_status_is_journalled_only_as_a_heartbeat(tmp_path):
    clock = Clock()
    j = Journal(tmp_path, clock=clock)
    idle = {"scored": 10, "updates": 2, "uptime_s": 1.0}
    written = []
    for tick in range(120):  # ten minutes of 5-second intervals, idle
        clock.t += 5
        written.append(j.append_if_changed("status", idle | {"uptime_s": float(tick)}))
    assert sum(written) == 2  # the first, and one heartbeat after 300 s
    clock.t += 5
    assert j.append_if_changed("status", idle | {"scored": 11})  # a change is written at once
    j.close()
    assert [r["scored"] for r in journal.read(tmp_path, "status")] == [10, 10, 11]


def test_the_report_reads_the_rotated_set(tmp_path):
    from actprm.daemon.report.read import read_state

    j = Journal(tmp_path, max_bytes=200, keep=100)
    for i in range(50):
        j.append("labels", {"id": f"l{i}", "first_error": -1})
    j.close()
    assert len(journal_files(tmp_path / "learning", "labels")) > 5
    st = read_state(tmp_path)
    assert [r["id"] for r in st.journal["labels"]] == [f"l{i}" for i in range(50)] and st.present["labels"]
