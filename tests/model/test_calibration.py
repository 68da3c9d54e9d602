"""model/eval/calibration.py on hand-worked numbers."""

from __future__ import annotations

import pytest

from actprm.model.eval.calibration import (Bin, auto_window, calibration_over_time, expected_calibration_error,
                                      labelled_steps, pairs, reliability, windows)


def test_labelled_steps_stop_at_the_first_error_and_at_the_scored_steps():
    assert labelled_steps([0.9, 0.8, 0.3, 0.7], 2) == ([0.9, 0.8, 0.3], [1, 1, 0])  # step 3 is not judged
    assert labelled_steps([0.6, 0.95], -1) == ([0.6, 0.95], [1, 1])
    assert labelled_steps([0.9], 3) == ([0.9], [1])  # truncated before its error: the kept step is correct
    assert labelled_steps([], -1) == ([], [])
    with pytest.raises(ValueError, match="below -1"):
        labelled_steps([0.5], -2)


def test_pairs_skip_labels_without_scores():
    s, y = pairs([([0.9, 0.8, 0.3, 0.7], 2), (None, 0), ([0.6, 0.95], -1)])
    assert s.tolist() == [0.9, 0.8, 0.3, 0.6, 0.95] and y.tolist() == [1, 1, 0, 1, 1]


def test_reliability_and_ece_hand_worked():
    # Two bins: [0, 0.5) holds 0.3 (wrong); [0.5, 1] holds 0.9, 0.8, 0.6, 0.95 (all right).
    bins = reliability([0.9, 0.8, 0.3, 0.6, 0.95], [1, 1, 0, 1, 1], n_bins=2)
    assert bins[0] == Bin(lo=0.0, hi=0.5, n=1, confidence=0.3, accuracy=0.0)
    assert bins[1].n == 4 and bins[1].confidence == pytest.approx(3.25 / 4) and bins[1].accuracy == 1.0
    # ECE = 1/5 * |0 - 0.3| + 4/5 * |1 - 0.8125| = 0.06 + 0.15
    assert expected_calibration_error(bins) == pytest.approx(0.21)


def test_bin_edges():
    bins = reliability([0.0, 0.5, 1.0, 0.0999], [0, 1, 1, 0], n_bins=10)
    assert [b.n for b in bins] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # 1.0 in the last bin, 0.5 starts bin 5
    assert bins[1].confidence is None and bins[1].accuracy is None
    assert bins[0].confidence == pytest.approx(0.04995)
    # Perfectly calibrated at the extremes: 0.0 wrong, 1.0 right; 0.5 right costs 0.5 * 1/4.
    assert expected_calibration_error(bins) == pytest.approx((2 * 0.04995 + 0.5 + 0.0) / 4)


def test_no_steps_no_ece_and_bad_input_is_refused():
    assert expected_calibration_error(reliability([], [], n_bins=5)) is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability([1.2], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability([float("nan")], [1])
    with pytest.raises(ValueError, match="2 scores for 1 outcomes"):
        reliability([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="n_bins"):
        reliability([0.1], [1], n_bins=0)


def test_windows():
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]  # a last window of half the size stays
    assert windows(9, 4) == [(0, 4), (4, 9)]  # a shorter one joins the one before
    assert windows(3, 4) == [(0, 3)]
    assert windows(0, 4) == []
    with pytest.raises(ValueError):
        windows(5, 0)
    assert auto_window(100_000) == 5000 and auto_window(1000) == 100 and auto_window(30) == 20


def test_calibration_over_time_shows_drift():
    labels = [([1.0], -1), ([0.0], 0), (None, 1),  # window 1: perfectly calibrated (one label unscored)
              ([0.9], 0), ([0.2], -1)]  # window 2: confidently wrong both ways
    w1, w2 = calibration_over_time(labels, size=3, n_bins=2)
    assert (w1.start, w1.end, w1.n_steps, w1.ece) == (0, 3, 2, 0.0)
    assert (w2.start, w2.end, w2.n_steps) == (3, 5, 2)
    assert w2.ece == pytest.approx(0.5 * 0.9 + 0.5 * 0.8)
    assert [b.n for b in w2.bins] == [1, 1]
