"""bench soak's summary on samples written here: growth per 10,000 trajectories after the
warm-up, and the RSS window the goal is judged on (medians of its first and last minute)."""

from __future__ import annotations

from actprm.daemon.bench.soak import summarise


def _sample(t: float, scored: int, rss: float) -> dict:
    return {"t_s": t, "scored": scored, "status_s": 0.05, "daemon_rss_mb": rss, "broker_rss_mb": 50.0,
            "daemon_memory": {"RssAnon": rss - 100, "RssFile": 100.0}, "dirs_mb": {"ledger": scored / 10_000}, "files": 10}


def test_the_rss_window_takes_medians_so_one_sample_in_a_sawtooth_does_not_decide_the_goal():
    # Flat at 600 MB with a 40 MB tooth every fourth sample; the last sample falls on a tooth.
    rss = [600.0 + (40.0 if i % 4 == 3 else 0.0) for i in range(40)]
    samples = [_sample(15.0 * i, 1000 * i, r) for i, r in enumerate(rss)]
    out = summarise(samples, warmup_s=60.0, rate=90.0, project_rate=100.0)
    assert out["daemon_rss_change_pct"] == round(100 * 40 / 600, 1)  # two single samples: +6.7%, a miss
    window = out["daemon_rss_window"]
    assert (window["first_median_mb"], window["last_median_mb"], window["max_mb"]) == (600.0, 600.0, 640.0)
    assert window["change_pct"] == 0.0 and window["minutes"] == round((585 - 60) / 60, 1)
    assert out["growth"]["ledger_mb"]["per_10k"] == 1.0  # the slope against trajectories scored


def test_real_growth_shows_in_the_window():
    samples = [_sample(15.0 * i, 1000 * i, 600.0 + 2.0 * i) for i in range(40)]
    window = summarise(samples, warmup_s=0.0, rate=90.0, project_rate=100.0)["daemon_rss_window"]
    assert window["first_median_mb"] == 604.0 and window["last_median_mb"] == 674.0  # medians of 5 samples each
    assert window["change_pct"] == round(100 * 70 / 604, 1)
