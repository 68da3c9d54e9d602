"""The ledger's retention: dedupe keys live in time buckets dropped whole (injected clocks)."""

from __future__ import annotations

import json

import pytest
from rocksdict import Rdict

from actprm.streams.state.ledger import (ADMITTED, BUCKETS, CANARY, JUDGED, META, PENDING, SCORED, TRAINED, Ledger,
                                   bounded_options, mark_trained)

DAY = 86400.0


class Clock:
    def __init__(self, t: float = 1_000 * DAY):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _raw_keys(ledger: Ledger) -> list[bytes]:
    return [k for k, _ in ledger._db.items()]


def test_a_key_lives_at_least_the_retention_and_at_most_one_bucket_more(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    assert led.bucket_s == DAY
    led.put(SCORED, "t1", {"version": 3})
    clock.t += 7 * DAY - 1  # just inside the retention
    assert led.get(SCORED, "t1") == {"version": 3} and led.has(SCORED, "t1")
    clock.t += DAY + 1  # past retention + one bucket: always gone
    assert led.get(SCORED, "t1") is None and not led.has(SCORED, "t1")


def test_expiry_drops_whole_buckets_and_keeps_working_state(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    for day in range(10):
        for i in range(50):
            led.put(SCORED, f"d{day}-{i}", {"version": day})
            led.put(TRAINED, f"l{day}-{i}", day)
        clock.t += DAY
    # The writes themselves dropped the old buckets as the clock moved: no scan, one range each.
    scored_days = sorted({json.loads(v)["version"] for k, v in led._db.items() if k.startswith(b"scored@")})
    assert scored_days == [2, 3, 4, 5, 6, 7, 8, 9]  # BUCKETS + 1 buckets, as of the last write (day 9)
    assert led.get(TRAINED, "l1-0") is None
    # Now day 10: day 2 is past the retention; still on disk until the next drop, never read.
    assert led.count(SCORED) == 7 * 50 and led.count(TRAINED) == 7 * 50
    assert led.get(SCORED, "d2-0") is None and led.get(SCORED, "d3-0") == {"version": 3}
    led.put(PENDING, "p", {"label": 1})  # the first write of day 10 drops day 2
    led.put(CANARY, "c", {"label": 2})
    led.put(META, "round", {"round_id": 4})
    assert min(json.loads(v)["version"] for k, v in led._db.items() if k.startswith(b"scored@")) == 3
    clock.t += 30 * DAY
    assert led.expire() > 0
    assert [k for k in _raw_keys(led) if b"@" in k] == []
    assert led.get(PENDING, "p") == {"label": 1} and led.get(CANARY, "c") == {"label": 2}
    assert led.get(META, "round") == {"round_id": 4}


def test_a_rewritten_key_reads_its_newest_value_and_delete_removes_every_copy(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    led.put(JUDGED, "t", {"first_error": 1})
    clock.t += 2 * DAY
    led.put(JUDGED, "t", {"dead": "timeout"})  # a newer bucket
    assert led.get(JUDGED, "t") == {"dead": "timeout"}
    assert list(led.items(JUDGED)) == [("t", {"dead": "timeout"})]
    clock.t += 6 * DAY  # the first write's bucket expired, the second lives
    assert led.get(JUDGED, "t") == {"dead": "timeout"}
    led.delete(JUDGED, "t")
    assert led.get(JUDGED, "t") is None and list(led.items(JUDGED)) == []


def test_transactions_land_together_across_namespaces(tmp_path):
    led = Ledger(tmp_path, clock=Clock())
    led.put(PENDING, "l1", {"label": 1})
    with pytest.raises(RuntimeError):
        with led.transaction():
            mark_trained(led, ["l1"], 5)
            raise RuntimeError("crash")
    assert led.get(TRAINED, "l1") is None and led.has(PENDING, "l1")
    mark_trained(led, ["l1"], 5)
    assert led.get(TRAINED, "l1") == 5 and not led.has(PENDING, "l1")


def test_reopening_keeps_the_live_keys(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    led.put(ADMITTED, "t", 3)
    led.close()
    clock.t += 3 * DAY
    again = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    assert again.get(ADMITTED, "t") == 3
    again.close()
    clock.t += 6 * DAY
    assert Ledger(tmp_path, retention_s=7 * DAY, clock=clock).get(ADMITTED, "t") is None


def test_an_older_layouts_keys_are_read_then_dropped_one_retention_later(tmp_path):
    old = Rdict(str(tmp_path), options=bounded_options())
    old[b"scored/old"] = json.dumps({"version": 1}).encode()
    old[b"pending/p"] = json.dumps(1).encode()
    old.close()
    clock = Clock()
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    assert led.get(SCORED, "old") == {"version": 1} and list(led.items(SCORED)) == [("old", {"version": 1})]
    clock.t += 7 * DAY + 1
    led.expire()
    assert led.get(SCORED, "old") is None and led.get(PENDING, "p") == 1


def test_no_retention_keeps_every_key(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path, retention_s=None, clock=clock)
    led.put(SCORED, "t", 1)
    clock.t += 1000 * DAY
    assert led.expire() == 0 and led.get(SCORED, "t") == 1 and _raw_keys(led) == [b"scored/t"]


def test_a_lookup_checks_only_the_live_buckets(tmp_path):
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=Clock())
    assert len(led._live(SCORED)) == BUCKETS + 2  # the live buckets and the older layout's keys
    assert led._live(PENDING) == [b"pending/"]


def test_dropped_buckets_give_their_disk_space_back(tmp_path):
    def sst_bytes() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("*.sst"))

    clock = Clock()
    led = Ledger(tmp_path, retention_s=7 * DAY, clock=clock)
    with led.transaction():
        for i in range(20_000):
            led.put(SCORED, f"t{i}", {"version": i, "reward": {"mu": [i / 20_000] * 6, "id": f"t{i}"}})
    led.flush()
    full = sst_bytes()
    assert full > 200_000
    clock.t += 9 * DAY
    led.expire()
    assert sst_bytes() < full / 10 and led.count(SCORED) == 0
