"""Step labels from the judge's first-error index."""

from __future__ import annotations

import torch


def step_labels(first_error: int, n_steps: int) -> list[float | None]:
    """1 for steps before the first error, 0 at it, None (no label) after it; -1 = all correct."""
    if first_error < -1 or first_error >= n_steps:
        raise ValueError(f"first-error index {first_error} is out of range for {n_steps} steps")
    if first_error == -1:
        return [1.0] * n_steps
    return [1.0] * first_error + [0.0] + [None] * (n_steps - first_error - 1)


def label_tensors(first_errors: list[int], n_scored: list[int], S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and a mask, both (B, S), for a batch whose b-th row scored n_scored[b] steps.

    A trajectory truncated before its first error still labels the steps it kept.
    """
    targets, mask = [], []
    for k, n in zip(first_errors, n_scored):
        labels = step_labels(k, max(n, k + 1))[:n] + [None] * (S - n)
        targets.append([0.0 if y is None else y for y in labels])
        mask.append([y is not None for y in labels])
    if not targets:
        return torch.zeros((0, S)), torch.zeros((0, S), dtype=torch.bool)
    return torch.tensor(targets), torch.tensor(mask)  # (B, S), (B, S)
