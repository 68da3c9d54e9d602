"""Prequential (test-then-train) evaluation: every judged label first tests the version that
scored its trajectory, then trains the next one.

A live service has no fixed test set, but each label arrives with the scores (mu) the serving
version gave that trajectory, so comparing them with the judge's verdict is an honest measure
of that version on fresh data. Labels are chosen by uncertainty, so these figures are
pessimistic: they are taken on exactly the trajectories the PRM found hardest. The labels of
the stream's validation sample (judged whether selected or not) are the stream as it comes: the
daemon keeps a second window of those alone, an unbiased figure of the PRM its RL run reads.

Pure functions and a small windowed aggregate; the daemon keeps two `OnlineWindow`s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from actprm.model.labels import step_labels
from actprm.model.eval.metrics import processbench_scores
from actprm.model.uncertainty import predicted_first_error


@dataclass(frozen=True)
class LabelTest:
    """What one label says about the version that scored its trajectory."""

    version: int | None
    predicted: int  # first step with mu < threshold, -1 when none
    gold: int  # the judge's first error, -1 = all correct
    steps_right: int  # labelled steps whose mu is on the judge's side of the threshold
    steps_labelled: int


def score_label(mu: Sequence[float], gold: int, n_steps: int, version: int | None = None,
               threshold: float = 0.5) -> LabelTest:
    """Score one label against the mu the version gave it. Steps after the first error carry
    no label and are not counted; a truncated mu covers only its own steps."""
    labels = step_labels(gold, max(n_steps, gold + 1))[: len(mu)]
    right = total = 0
    for m, y in zip(mu, labels):
        if y is not None:
            total += 1
            right += int((m >= threshold) == (y == 1.0))
    return LabelTest(version, predicted_first_error(mu, threshold), gold, right, total)


def summarise_tests(tests: Sequence[LabelTest]) -> dict:
    """online_f1 (ProcessBench: harmonic mean of the accuracy on erroneous and on correct
    trajectories; None until both kinds are present), step_accuracy, first_error_agreement
    (predicted first error == the judge's), and the number of labels."""
    if not tests:
        return {"online_f1": None, "step_accuracy": None, "first_error_agreement": None, "labels": 0}
    pb = processbench_scores([t.predicted for t in tests], [t.gold for t in tests])
    steps = sum(t.steps_labelled for t in tests)
    return {"online_f1": pb["f1"],
            "step_accuracy": sum(t.steps_right for t in tests) / steps if steps else None,
            "first_error_agreement": sum(t.predicted == t.gold for t in tests) / len(tests),
            "labels": len(tests)}


class OnlineWindow:
    """The last `size` label tests, summarised overall and per scoring version."""

    def __init__(self, size: int = 64):
        self.size = size
        self.tests: deque[LabelTest] = deque(maxlen=size)

    def add(self, test: LabelTest) -> None:
        self.tests.append(test)

    def summary(self) -> dict:
        out = summarise_tests(self.tests) | {"window": self.size}
        by_version: dict[int, list[LabelTest]] = {}
        for t in self.tests:
            if t.version is not None:
                by_version.setdefault(t.version, []).append(t)
        out["by_version"] = {str(v): summarise_tests(ts) for v, ts in sorted(by_version.items())}
        return out
