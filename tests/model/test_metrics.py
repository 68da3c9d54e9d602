"""Metrics against hand-worked numbers (the arithmetic is in the comments)."""

from __future__ import annotations

import math
import random

import pytest

from actprm.model.eval.metrics import (
    DEFAULT_GRID,
    best_threshold,
    predicted_first_errors,
    prmbench_by_class,
    prmbench_score,
    processbench_scores,
    spread_of_newest,
    step_auc,
)


# ---------------------------------------------------------------- predicted_first_errors


def test_predicted_first_errors_default_threshold():
    scores = [[0.9, 0.4, 0.8], [0.7, 0.6], [0.2], [0.5, 0.49], []]
    # [0.9, 0.4, 0.8]: 0.4 < 0.5 at index 1
    # [0.7, 0.6]: nothing below 0.5 -> -1
    # [0.2]: index 0
    # [0.5, 0.49]: 0.5 is not < 0.5 (a step AT the threshold is correct), 0.49 is -> 1
    # []: no step, no error -> -1
    assert predicted_first_errors(scores) == [1, -1, 0, 1, -1]


def test_predicted_first_errors_custom_threshold():
    scores = [[0.9, 0.4, 0.8], [0.7, 0.6], [0.2], [0.5, 0.49]]
    # threshold 0.65: 0.4 -> 1; 0.6 < 0.65 -> 1; 0.2 -> 0; 0.5 -> 0
    assert predicted_first_errors(scores, threshold=0.65) == [1, 1, 0, 0]


def test_predicted_first_errors_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        predicted_first_errors([[0.9, float("nan")]])


# ---------------------------------------------------------------- processbench_scores


def test_processbench_scores_hand_worked():
    predicted = [1, -1, 2, 0, -1, 3]
    gold = [1, 2, 2, -1, -1, -1]
    # records with an error: #0 1==1 hit, #1 -1!=2 miss, #2 2==2 hit -> acc_error = 2/3
    # fully correct records: #3 0 miss, #4 -1 hit, #5 3 miss        -> acc_correct = 1/3
    # f1 = 2 * (2/3) * (1/3) / (2/3 + 1/3) = (4/9) / 1 = 4/9
    r = processbench_scores(predicted, gold)
    assert r["acc_error"] == pytest.approx(2 / 3)
    assert r["acc_correct"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(4 / 9)
    assert (r["n"], r["n_error"], r["n_correct"]) == (6, 3, 3)


def test_processbench_scores_perfect_and_zero():
    assert processbench_scores([0, -1], [0, -1])["f1"] == 1.0
    # both accuracies 0 -> f1 is 0, not a division by zero
    r = processbench_scores([-1, 0], [0, -1])
    assert (r["acc_error"], r["acc_correct"], r["f1"]) == (0.0, 0.0, 0.0)


def test_processbench_scores_empty_group_gives_none():
    # only fully correct records: no accuracy on erroneous records, F1 undefined
    r = processbench_scores([-1, 2], [-1, -1])
    assert r["acc_error"] is None
    assert r["acc_correct"] == 0.5
    assert r["f1"] is None
    assert (r["n"], r["n_error"], r["n_correct"]) == (2, 0, 2)
    r = processbench_scores([1], [1])
    assert (r["acc_error"], r["acc_correct"], r["f1"]) == (1.0, None, None)
    r = processbench_scores([], [])
    assert (r["acc_error"], r["acc_correct"], r["f1"], r["n"]) == (None, None, None, 0)


def test_processbench_scores_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        processbench_scores([0, 1], [0])


# ---------------------------------------------------------------- best_threshold


def test_best_threshold_hand_worked():
    scores = [[0.9, 0.3], [0.8, 0.6], [0.45, 0.9], [0.7, 0.55]]
    gold = [1, -1, 0, -1]
    # t=0.4: preds [1, -1, -1, -1]: errors 1/2 (r2 missed), correct 2/2 -> f1 = 2*.5*1/1.5 = 2/3
    # t=0.5: preds [1, -1, 0, -1]: all right -> f1 = 1
    # t=0.6: preds [1, -1, 0, 1] (0.6 is not < 0.6, 0.55 is): errors 2/2, correct 1/2 -> 2/3
    t, f1 = best_threshold(scores, gold, grid=(0.4, 0.5, 0.6))
    assert (t, f1) == (0.5, 1.0)
    t, f1 = best_threshold(scores, gold, grid=(0.4, 0.6))
    # a tie at 2/3: both are 0.1 from 0.5, the lower one wins
    assert t == 0.4 and f1 == pytest.approx(2 / 3)


def test_best_threshold_tie_prefers_closest_to_half():
    scores = [[0.9, 0.3], [0.8, 0.9]]
    gold = [1, -1]
    # every threshold in (0.3, 0.8] is perfect; 0.35 is 0.15 from 0.5, 0.7 is 0.2 from it
    assert best_threshold(scores, gold, grid=(0.7, 0.35)) == (0.35, 1.0)
    assert best_threshold(scores, gold) == (0.5, 1.0)  # default grid 0.05..0.95 holds 0.5
    assert 0.5 in DEFAULT_GRID and len(DEFAULT_GRID) == 19


def test_best_threshold_undefined_f1():
    with pytest.raises(ValueError, match="undefined"):
        best_threshold([[0.9]], [-1])
    with pytest.raises(ValueError, match="empty"):
        best_threshold([[0.9]], [-1], grid=())


# ---------------------------------------------------------------- PRMBench


def test_prmbench_score_hand_worked():
    scores = [[0.9, 0.8, 0.3, 0.6], [0.4, 0.7]]
    errors = [[2, 3], []]
    # positive class = correct step (score >= 0.5)
    # record A: s0 correct/said correct TP, s1 TP, s2 wrong/said wrong TN, s3 wrong/said correct FP
    # record B: s0 correct/said wrong FN, s1 TP
    # TP=3 FP=1 TN=1 FN=1
    # F1_correct = 2*3 / (2*3 + 1 + 1) = 6/8 = 0.75
    # F1_wrong   = 2*1 / (2*1 + FN 1 + FP 1) = 2/4 = 0.5
    # PRMScore = 0.5*0.75 + 0.5*0.5 = 0.625
    r = prmbench_score(scores, errors)
    assert (r["tp"], r["fp"], r["tn"], r["fn"], r["n_steps"]) == (3, 1, 1, 1, 6)
    assert r["f1_correct"] == pytest.approx(0.75)
    assert r["f1_wrong"] == pytest.approx(0.5)
    assert r["prmscore"] == pytest.approx(0.625)
    assert r["precision_correct"] == pytest.approx(3 / 4) and r["recall_correct"] == pytest.approx(3 / 4)
    assert r["precision_wrong"] == pytest.approx(1 / 2) and r["recall_wrong"] == pytest.approx(1 / 2)


def test_prmbench_score_threshold_and_truncation():
    # threshold 0.65: A s3 (0.6) now said wrong -> TN; B s1 (0.7) still TP
    # TP=2 (A s0, s1)+1 (B s1)=3, FP=0, TN=2, FN=1 (B s0)
    # F1_correct = 6/(6+0+1) = 6/7; F1_wrong = 4/(4+1+0) = 4/5; PRMScore = 3/7 + 2/5 = 29/35
    r = prmbench_score([[0.9, 0.8, 0.3, 0.6], [0.4, 0.7]], [[2, 3], []], threshold=0.65)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (3, 0, 2, 1)
    assert r["prmscore"] == pytest.approx(29 / 35)
    # a truncated trajectory: the error steps 2, 3 were not scored, so no wrong step is seen;
    # F1 of the wrong class is undefined (no wrong step, none predicted) and so is PRMScore
    r = prmbench_score([[0.9, 0.8]], [[2, 3]])
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 0, 0, 0)
    assert r["f1_correct"] == 1.0 and r["f1_wrong"] is None and r["prmscore"] is None
    assert r["precision_wrong"] is None and r["recall_wrong"] is None


def test_prmbench_score_zero_f1_is_zero_not_undefined():
    # all steps mislabelled: TP=0 FP=1 TN=0 FN=1 -> both F1 are 0/(0+1+1) = 0
    r = prmbench_score([[0.2, 0.9]], [[1]])
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (0, 1, 0, 1)
    assert (r["f1_correct"], r["f1_wrong"], r["prmscore"]) == (0.0, 0.0, 0.0)


def test_prmbench_score_validation():
    with pytest.raises(ValueError, match="0-based"):
        prmbench_score([[0.9]], [[-1]])
    with pytest.raises(ValueError, match="1 score lists for 2"):
        prmbench_score([[0.9]], [[], []])


def test_prmbench_by_class_hand_worked():
    scores = [[0.9, 0.8, 0.3, 0.6], [0.4, 0.7]]
    errors = [[2, 3], []]
    classes = ["circular", "correct"]
    r = prmbench_by_class(scores, errors, classes)
    # circular (record A): TP=2 FP=1 TN=1 FN=0
    #   F1_correct = 4/(4+1+0) = 0.8, F1_wrong = 2/(2+0+1) = 2/3, PRMScore = 0.4 + 1/3
    assert r["circular"]["f1_correct"] == pytest.approx(0.8)
    assert r["circular"]["f1_wrong"] == pytest.approx(2 / 3)
    assert r["circular"]["prmscore"] == pytest.approx(0.4 + 1 / 3)
    # correct (record B): TP=1 FP=0 TN=0 FN=1
    #   F1_correct = 2/(2+0+1) = 2/3, F1_wrong = 0/(0+1+0) = 0, PRMScore = 1/3
    assert r["correct"]["prmscore"] == pytest.approx(1 / 3)
    # overall pools both: the 0.625 of test_prmbench_score_hand_worked
    assert r["overall"]["prmscore"] == pytest.approx(0.625)
    assert set(r) == {"circular", "correct", "overall"}
    # the official toolkit leaves its "correct" samples out of the overall score
    r = prmbench_by_class(scores, errors, classes, exclude_from_overall=("correct",))
    assert r["overall"] == r["circular"]
    assert r["correct"]["prmscore"] == pytest.approx(1 / 3)


def test_prmbench_by_class_validation():
    with pytest.raises(ValueError, match="lengths differ"):
        prmbench_by_class([[0.9]], [[]], ["a", "b"])
    with pytest.raises(ValueError, match="overall"):
        prmbench_by_class([[0.9]], [[]], ["overall"])


# ---------------------------------------------------------------- step_auc


def test_step_auc_hand_worked_with_ties():
    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    labels = [1, 1, 0, 0, 1]
    # positives 0.9, 0.8, 0.1; negatives 0.8, 0.3 -> 6 pairs
    # 0.9 beats both (2); 0.8 ties 0.8 (0.5) and beats 0.3 (1); 0.1 beats none (0) -> 3.5/6
    # by ranks: 0.1->1, 0.3->2, 0.8,0.8->3.5 each, 0.9->5; positive rank sum 1+3.5+5 = 9.5
    # U = 9.5 - 3*4/2 = 3.5; AUC = 3.5 / (3*2) = 7/12
    assert step_auc(scores, labels) == pytest.approx(7 / 12)


def test_step_auc_extremes_and_unlabelled():
    assert step_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert step_auc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert step_auc([0.5, 0.5], [1, 0]) == 0.5  # a pure tie is a coin flip
    # None (unlabelled step after the first error) is ignored; bools work as labels
    assert step_auc([0.9, 0.1, 0.99], [True, False, None]) == 1.0
    assert math.isnan(step_auc([0.9, 0.8], [1, 1]))  # one class only
    assert math.isnan(step_auc([], []))
    with pytest.raises(ValueError, match="not 0, 1 or None"):
        step_auc([0.9], [2])
    with pytest.raises(ValueError, match="2 scores for 1 labels"):
        step_auc([0.9, 0.1], [1])


def test_step_auc_matches_pair_counting():
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 30)
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(n)]  # many ties
        labels = [rng.randint(0, 1) for _ in range(n)]
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if not pos or not neg:
            continue
        pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
        assert step_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


# ---------------------------------------------------------------- spread_of_newest


def test_spread_of_newest_versions():
    f1 = {0: 0.22, 5: 0.70, 3: 0.60, 7: None, 9: 0.74, 8: 0.71}
    # by version: 0.22, 0.60, 0.70, (7 has none), 0.71, 0.74; the newest 3 with a figure are
    # versions 5, 8, 9: 0.74 - 0.70 = 0.04
    assert spread_of_newest(f1, n=3) == pytest.approx(0.04)
    assert spread_of_newest(f1, n=10) == pytest.approx(0.74 - 0.22)  # fewer than n: all of them
    assert spread_of_newest({4: 0.5}) is None and spread_of_newest({4: 0.5, 5: None}) is None
