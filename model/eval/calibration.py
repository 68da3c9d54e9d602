"""Calibration of the ensemble's step scores against the judge: reliability bins and ECE.

Pure functions over plain lists (numpy inside for speed: a long run has 100,000 labels and
about a million labelled steps). Conventions, the same as the trainer's (model/labels.py):
- a step score mu is the PRM's probability that the step is correct;
- the judge's first-error index labels steps 1 before it, 0 at it, nothing after it (the steps
  after the first error are not judged); -1 labels every step 1;
- a score of exactly 1.0 falls in the last bin, every other score s in bin floor(s * n_bins).
Expected calibration error (ECE) = sum over bins of (n_b / N) * |accuracy_b - confidence_b|,
where confidence_b is the mean score in the bin and accuracy_b the share of its steps the
judge called correct. No labelled step: no ECE (None), never 0, which would read as perfect.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    n: int  # labelled steps whose score fell here
    confidence: float | None  # mean score of those steps (None when n == 0)
    accuracy: float | None  # share of them the judge labelled correct


def labelled_steps(mu: Sequence[float], first_error: int) -> tuple[list[float], list[int]]:
    """The (score, label) pairs of one trajectory: steps up to and including the first error.

    `mu` may be shorter than the trajectory (the scorer truncated it): only scored steps count.
    """
    if first_error < -1:
        raise ValueError(f"first-error index {first_error} is below -1")
    n = len(mu) if first_error == -1 else min(len(mu), first_error + 1)
    return [float(m) for m in mu[:n]], [0 if i == first_error else 1 for i in range(n)]


def pairs(labels: Iterable[tuple[Sequence[float] | None, int]]) -> tuple[np.ndarray, np.ndarray]:
    """All (scores, outcomes) of many (mu, first_error) labels; a label without mu adds none."""
    scores: list[float] = []
    outcomes: list[int] = []
    for mu, first_error in labels:
        if mu:
            s, y = labelled_steps(mu, first_error)
            scores += s
            outcomes += y
    return np.asarray(scores, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)


def reliability(scores: Sequence[float] | np.ndarray, outcomes: Sequence[int] | np.ndarray, n_bins: int = 10) -> list[Bin]:
    """Equal-width bins over [0, 1]: per bin the count, mean score and observed accuracy."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} outcomes")
    if s.size and (np.isnan(s).any() or s.min() < 0 or s.max() > 1):
        raise ValueError("step scores must be probabilities in [0, 1]")
    idx = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)  # 1.0 goes in the last bin
    n = np.bincount(idx, minlength=n_bins)
    sum_s = np.bincount(idx, weights=s, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    bins = []
    for b in range(n_bins):
        k = int(n[b])
        bins.append(Bin(lo=b / n_bins, hi=(b + 1) / n_bins, n=k,
                        confidence=float(sum_s[b] / k) if k else None,
                        accuracy=float(sum_y[b] / k) if k else None))
    return bins


def expected_calibration_error(bins: Sequence[Bin]) -> float | None:
    """sum_b (n_b / N) |accuracy_b - confidence_b|; None when no step is in any bin."""
    total = sum(b.n for b in bins)
    if total == 0:
        return None
    return float(sum(b.n / total * abs(b.accuracy - b.confidence) for b in bins if b.n))


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) spans of `size` items over n items in order; the last one may be shorter,
    and is merged into the one before when it is under half a window (too few to read)."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    spans = [(i, min(i + size, n)) for i in range(0, n, size)]
    if len(spans) >= 2 and spans[-1][1] - spans[-1][0] < size / 2:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


def auto_window(n_labels: int, target_windows: int = 10, min_size: int = 20, max_size: int = 5000) -> int:
    """A window size giving about `target_windows` windows, each with enough labels to bin."""
    return max(min_size, min(max_size, -(-n_labels // target_windows)))


@dataclass(frozen=True)
class Window:
    start: int  # index of the first label (in arrival order)
    end: int  # one past the last
    n_steps: int  # labelled steps with a score
    ece: float | None
    bins: list[Bin]


def calibration_over_time(labels: Sequence[tuple[Sequence[float] | None, int]], size: int,
                          n_bins: int = 10) -> list[Window]:
    """Reliability bins and ECE per window of `size` labels, labels in arrival order."""
    out = []
    for start, end in windows(len(labels), size):
        s, y = pairs(labels[start:end])
        bins = reliability(s, y, n_bins)
        out.append(Window(start, end, int(s.size), expected_calibration_error(bins), bins))
    return out
