"""Evaluation metrics: ProcessBench F1, PRMBench PRMScore, step-level ROC AUC, the spread of
a run's newest versions.

Pure functions over plain lists. Conventions:
- A step score is the PRM's probability that the step is correct.
- ProcessBench: the predicted earliest error is the first step whose score is below the
  threshold, -1 if none; F1 is the harmonic mean of the accuracy on records with an error and
  the accuracy on fully correct records. An empty group has no accuracy (None), and then F1
  is None too: it is undefined, and reporting 0 would look like a failed model.
- PRMBench: every step is classified (score >= threshold means "correct"); the confusion
  counts are pooled over all steps of all records; PRMScore = 0.5 * F1 with the correct steps
  as the positive class + 0.5 * F1 with the wrong steps as the positive class. Error steps are
  0-based here (as in `Record.extra["error_steps"]`); the PRMBench files are 1-based and the
  loader converts them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from actprm.model.uncertainty import predicted_first_error

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def _check_score(x: float) -> float:
    x = float(x)
    if math.isnan(x):
        # NaN < threshold is False, so a NaN would silently count as a correct step.
        raise ValueError("a step score is NaN")
    return x


def predicted_first_errors(step_scores: Sequence[Sequence[float]], threshold: float = 0.5) -> list[int]:
    """Per record, the first step whose score is < threshold, or -1 when there is none.

    Steps are checked for NaN lazily, up to the first error, as the rule reads them."""
    return [predicted_first_error(map(_check_score, scores), threshold) for scores in step_scores]


def _f1_of_accuracies(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def processbench_scores(predicted: Sequence[int], gold: Sequence[int]) -> dict:
    """ProcessBench accuracies and F1.

    Returns {"acc_error", "acc_correct", "f1", "n", "n_error", "n_correct"}.
    acc_error: share of records with gold != -1 whose predicted first error equals gold.
    acc_correct: share of records with gold == -1 predicted as -1.
    An empty group gives None for its accuracy and for f1; f1 is 0.0 when both are 0.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold labels")
    n_error = hit_error = n_correct = hit_correct = 0
    for p, g in zip(predicted, gold):
        if g == -1:
            n_correct += 1
            hit_correct += p == -1
        else:
            n_error += 1
            hit_error += p == g
    acc_error = hit_error / n_error if n_error else None
    acc_correct = hit_correct / n_correct if n_correct else None
    return {
        "acc_error": acc_error,
        "acc_correct": acc_correct,
        "f1": _f1_of_accuracies(acc_error, acc_correct),
        "n": len(gold),
        "n_error": n_error,
        "n_correct": n_correct,
    }


def best_threshold(
    step_scores: Sequence[Sequence[float]],
    gold: Sequence[int],
    grid: Sequence[float] = DEFAULT_GRID,
) -> tuple[float, float]:
    """The threshold in `grid` that maximises ProcessBench F1 on (step_scores, gold).

    Ties go to the threshold closest to 0.5 (the default, so a flat optimum does not move it),
    then to the lower one. Raises ValueError when F1 is undefined (gold has only one group)
    or the grid is empty.
    """
    if not grid:
        raise ValueError("empty threshold grid")
    if len(step_scores) != len(gold):
        raise ValueError(f"{len(step_scores)} score lists for {len(gold)} gold labels")
    best_t, best_f1 = 0.0, -1.0
    for t in sorted(grid, key=lambda t: (round(abs(t - 0.5), 9), t)):  # round: 0.4 and 0.6 tie exactly
        f1 = processbench_scores(predicted_first_errors(step_scores, t), gold)["f1"]
        if f1 is None:
            raise ValueError("ProcessBench F1 is undefined: gold needs records with and without an error")
        if f1 > best_f1:  # strict: the earlier threshold (closer to 0.5) wins ties
            best_t, best_f1 = t, f1
    return best_t, best_f1


def _f1_counts(tp: int, fp: int, fn: int) -> float | None:
    # F1 = 2TP / (2TP + FP + FN); undefined (None) only when the class is neither present nor
    # predicted. The official PRMBench code returns -1 there (and, through its -1 sentinels,
    # also when TP = 0 with FP, FN > 0, where F1 is really 0).
    d = 2 * tp + fp + fn
    return None if d == 0 else 2 * tp / d


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _confusion(
    step_scores: Sequence[Sequence[float]], error_steps_per_record: Sequence[Collection[int]], threshold: float
) -> tuple[int, int, int, int]:
    if len(step_scores) != len(error_steps_per_record):
        raise ValueError(f"{len(step_scores)} score lists for {len(error_steps_per_record)} error-step lists")
    tp = fp = tn = fn = 0  # positive = correct step
    for scores, errors in zip(step_scores, error_steps_per_record):
        wrong = set(errors)
        if any(e < 0 for e in wrong):
            raise ValueError(f"negative error step in {sorted(wrong)} (error steps are 0-based)")
        # Only scored steps count: a truncated trajectory has fewer scores than steps, and an
        # error step beyond the scored ones is not evaluated (as in the official toolkit).
        for i, s in enumerate(scores):
            said_correct = _check_score(s) >= threshold
            if i in wrong:
                fp += said_correct
                tn += not said_correct
            else:
                tp += said_correct
                fn += not said_correct
    return tp, fp, tn, fn


def _prmbench_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict:
    f1_correct = _f1_counts(tp, fp, fn)
    f1_wrong = _f1_counts(tn, fn, fp)  # wrong steps as the positive class: swap roles
    return {
        "prmscore": None if f1_correct is None or f1_wrong is None else 0.5 * f1_correct + 0.5 * f1_wrong,
        "f1_correct": f1_correct,
        "f1_wrong": f1_wrong,
        "precision_correct": _ratio(tp, tp + fp),
        "recall_correct": _ratio(tp, tp + fn),
        "precision_wrong": _ratio(tn, tn + fn),
        "recall_wrong": _ratio(tn, tn + fp),
        "tp": tp,  # correct step, scored correct
        "fp": fp,  # wrong step, scored correct
        "tn": tn,  # wrong step, scored wrong
        "fn": fn,  # correct step, scored wrong
        "n_steps": tp + fp + tn + fn,
    }


def prmbench_score(
    step_scores: Sequence[Sequence[float]],
    error_steps_per_record: Sequence[Collection[int]],
    threshold: float = 0.5,
) -> dict:
    """PRMBench step classification pooled over all steps of all records.

    error_steps_per_record: 0-based indices of the wrong steps of each record (may be empty);
    every other scored step is a correct step. Returns prmscore, f1_correct, f1_wrong,
    precisions/recalls of both classes (None when undefined), the counts tp/fp/tn/fn with
    "correct step" as the positive class, and n_steps. prmscore is None when either F1 is.
    """
    return _prmbench_from_counts(*_confusion(step_scores, error_steps_per_record, threshold))


def prmbench_by_class(
    records_scores: Sequence[Sequence[float]],
    error_steps: Sequence[Collection[int]],
    classes: Sequence[str],
    threshold: float = 0.5,
    exclude_from_overall: Collection[str] = (),
    correct_steps_only: Collection[str] = (),
) -> dict[str, dict]:
    """`prmbench_score` per error class plus "overall" (pooled over every record whose class is
    not in `exclude_from_overall`). The official toolkit builds fully correct samples of class
    "correct" and leaves them out of its overall score: pass exclude_from_overall=("correct",)
    to reproduce that. A class in `correct_steps_only` has no wrong steps by construction
    (PRMBench's "multi_solutions"), so its PRMScore is the F1 of correct steps alone, as the
    official evaluation scores it; averaging in the F1 of an absent class would halve it."""
    if not (len(records_scores) == len(error_steps) == len(classes)):
        raise ValueError(
            f"lengths differ: {len(records_scores)} score lists, {len(error_steps)} error-step lists, "
            f"{len(classes)} classes"
        )
    if "overall" in classes:
        raise ValueError("'overall' cannot be a class name: it is the key of the pooled result")
    counts: dict[str, list[int]] = {}
    total = [0, 0, 0, 0]
    for scores, errors, cls in zip(records_scores, error_steps, classes):
        c = _confusion([scores], [errors], threshold)
        acc = counts.setdefault(cls, [0, 0, 0, 0])
        for j in range(4):
            acc[j] += c[j]
            if cls not in exclude_from_overall:
                total[j] += c[j]
    out = {cls: _prmbench_from_counts(*c) for cls, c in sorted(counts.items())}
    for cls in correct_steps_only:
        if cls in out:
            out[cls]["prmscore"] = out[cls]["f1_correct"]
    out["overall"] = _prmbench_from_counts(*total)
    return out


def step_auc(scores: Sequence[float], labels: Sequence[int | bool | None]) -> float:
    """ROC AUC of `scores` for label 1 (correct step) against label 0 (wrong step).

    Rank based (Mann-Whitney U) with tied scores given their average rank, so a tie between a
    positive and a negative counts one half. Steps with label None (unlabelled, e.g. after the
    first error) are ignored. Returns NaN when one class is absent: a diagnostic must not
    crash a running service.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pairs = []
    for s, y in zip(scores, labels):
        if y is None:
            continue
        if y not in (0, 1):
            raise ValueError(f"step label {y!r} is not 0, 1 or None")
        pairs.append((_check_score(s), int(y)))
    n_pos = sum(y for _, y in pairs)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    pairs.sort(key=lambda p: p[0])
    rank_sum_pos = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # ranks are 1-based; a tie group shares the mean of its ranks
        rank_sum_pos += avg_rank * sum(y for _, y in pairs[i : j + 1])
        i = j + 1
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def spread_of_newest(f1_by_version: Mapping[int, float | None], n: int = 10) -> float | None:
    """max - min of the F1 of the n newest versions that have one: how steady the rewards of a
    run's last versions are (the demo's goal: within 0.08 over the last 10). Fewer than n
    versions with a figure: over those; fewer than 2: None."""
    newest = [f1 for _, f1 in sorted(f1_by_version.items()) if f1 is not None][-n:]
    return max(newest) - min(newest) if len(newest) >= 2 else None
