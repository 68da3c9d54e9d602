"""The fault suite's summary table: one row per fault scenario (faults injected, messages sent,
rewards, duplicates, dead letters, messages lost, repeated judgements and trainings) and a total,
printed at the end of the long suite and written to SUMMARY_FILE. It lives apart from any one
scenario because every scenario, crash trials and broker outages alike, reports into it, and
its format has a fast test of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_FILE = Path("/tmp/actprm-faults-summary.txt")

SUMMARY_COLUMNS = ("scenario", "faults injected", "messages sent", "rewards", "rewarded twice", "dead letters", "lost",
                   "judged twice", "trained twice")


@dataclass
class SummaryRow:
    scenario: str
    faults: int = 0
    sent: int = 0
    rewards: int = 0
    dead_letters: int = 0
    lost: int = 0
    judged_twice: int = 0
    trained_twice: int = 0
    # Ids with more than one reward (at-least-once: a scorer killed before it recorded a batch
    # scores it again); None where the scenario does not count them ("-").
    rewarded_twice: int | None = None
    notes: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, ...]:
        twice = "-" if self.rewarded_twice is None else str(self.rewarded_twice)
        return (self.scenario, str(self.faults), str(self.sent), str(self.rewards), twice, str(self.dead_letters),
                str(self.lost), str(self.judged_twice), str(self.trained_twice))


def format_summary(rows: list[SummaryRow]) -> str:
    table = [SUMMARY_COLUMNS, *(r.cells() for r in rows)]
    if len(rows) > 1:
        total = SummaryRow("total", *(sum(getattr(r, f) for r in rows) for f in
                                      ("faults", "sent", "rewards", "dead_letters", "lost", "judged_twice", "trained_twice")),
                           rewarded_twice=sum(r.rewarded_twice or 0 for r in rows))
        table.append(total.cells())
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_COLUMNS))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    out = [line(table[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in table[1:])]
    notes = [f"- {r.scenario}: {n}" for r in rows for n in r.notes]
    return "\n".join(out + ([""] + notes if notes else []))
