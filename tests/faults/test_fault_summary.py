"""The long fault suite's summary table counts duplicate rewards (at-least-once delivery)."""

from __future__ import annotations

from support.fault_summary import SummaryRow, format_summary


def test_the_summary_counts_ids_rewarded_twice_and_marks_scenarios_that_do_not_count_them():
    rows = [SummaryRow("crash", faults=3, sent=150, rewards=150, rewarded_twice=32),
            SummaryRow("outage", faults=1, sent=80, rewards=80)]
    lines = format_summary(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in lines[2:5]}
    at = header.index("rewarded twice")
    assert (cells["crash"][at], cells["outage"][at], cells["total"][at]) == ("32", "-", "32")
