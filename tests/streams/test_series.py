"""Bounded in-memory series give the figures the unbounded lists gave (streams/state/series.py)."""

from __future__ import annotations

import random

from actprm.streams.state.series import FlagSeries, KeepFirstAndLast, ThinnedList


def _share(flags: bytearray, part: slice):
    chunk = flags[part]
    return round(sum(chunk) / len(chunk), 4) if len(chunk) else None


def test_flag_series_gives_the_status_and_learning_shares_in_bounded_memory():
    rng = random.Random(0)
    series, flags = FlagSeries(tail=1000, marks=256), bytearray()
    for n in range(200_000):
        f = int(rng.random() < (0.6 if n < 100_000 else 0.3))  # the share falls halfway
        series.append(f)
        flags.append(f)
    assert len(series) == len(flags) == 200_000
    assert series.share(slice(-32, None)) == _share(flags, slice(-32, None))  # recent: exact
    q = len(flags) // 4
    # Older spans: within the resolution of the counts (one stride in a quarter of the run).
    assert abs(series.share(slice(len(flags) - q, None)) - _share(flags, slice(len(flags) - q, None))) < 0.005
    first = series.share(slice(0, q))
    assert abs(first - _share(flags, slice(0, q))) < 0.005
    assert abs(series.share(slice(12_345, 98_765)) - _share(flags, slice(12_345, 98_765))) < 0.005
    assert series.share(slice(5, 5)) is None and FlagSeries().share(slice(0, None)) is None
    assert len(series.marks) <= 256 and len(series.tail) == 1000


def test_thinned_list_keeps_the_first_and_newest_points_within_its_cap():
    curve = ThinnedList(cap=100)
    for i in range(10_000):
        curve.append({"labels": i})
    assert len(curve) <= 100 and curve[0] == {"labels": 0} and curve[-1] == {"labels": 9999}
    xs = [p["labels"] for p in curve]
    assert xs == sorted(xs)


def test_keep_first_and_last_keeps_v0_and_the_newest_versions():
    d = KeepFirstAndLast(keep=3)
    for v in range(10):
        d[v] = {"f1": v / 10}
    assert sorted(d) == [0, 7, 8, 9] and d.get(0) == {"f1": 0.0} and max(d) == 9
