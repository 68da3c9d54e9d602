"""Prequential metrics against hand-worked numbers."""

from __future__ import annotations

import pytest

from actprm.model.eval.prequential import LabelTest, OnlineWindow, summarise_tests, score_label


def test_a_label_tests_the_scores_it_came_with():
    # gold 1: labels [1, 0, -]; mu [0.9, 0.4, 0.8]: step 0 right (>= 0.5, correct), step 1 right
    # (< 0.5, wrong), step 2 unlabelled; predicted first error 1 = gold.
    t = score_label([0.9, 0.4, 0.8], gold=1, n_steps=3, version=2)
    assert t == LabelTest(version=2, predicted=1, gold=1, steps_right=2, steps_labelled=2)
    # all correct, but the PRM calls step 1 wrong: 2 of 3 steps right, first error 1 vs -1.
    assert score_label([0.7, 0.3, 0.6], gold=-1, n_steps=3) == LabelTest(None, 1, -1, 2, 3)
    # a truncated mu covers its own steps only
    assert score_label([0.8], gold=2, n_steps=4) == LabelTest(None, -1, 2, 1, 1)


def test_summary_is_processbench_f1_step_accuracy_and_agreement():
    tests = [LabelTest(0, 1, 1, 2, 2), LabelTest(0, -1, 2, 1, 3),  # erroneous: 1 of 2 found
             LabelTest(1, -1, -1, 3, 3), LabelTest(1, 0, -1, 0, 2)]  # correct: 1 of 2 called correct
    s = summarise_tests(tests)
    assert s["online_f1"] == pytest.approx(0.5)  # harmonic mean of 0.5 and 0.5
    assert s["step_accuracy"] == pytest.approx(6 / 10)
    assert s["first_error_agreement"] == pytest.approx(2 / 4)
    assert s["labels"] == 4
    # one kind only: no F1 yet, the other figures are there
    only_wrong = summarise_tests(tests[:2])
    assert only_wrong["online_f1"] is None and only_wrong["first_error_agreement"] == 0.5


def test_window_keeps_the_newest_and_splits_by_version():
    w = OnlineWindow(size=3)
    for t in [LabelTest(0, 1, 2, 0, 3), LabelTest(0, 2, 2, 3, 3), LabelTest(1, -1, -1, 2, 2), LabelTest(1, 1, 1, 2, 2)]:
        w.add(t)
    s = w.summary()
    assert s["labels"] == 3 and s["window"] == 3  # the oldest (a miss) fell out
    assert s["online_f1"] == pytest.approx(1.0)
    assert set(s["by_version"]) == {"0", "1"} and s["by_version"]["1"]["labels"] == 2
    assert summarise_tests([])["online_f1"] is None
