"""Step labels from the judge's first-error index k.

Rule: steps 0..k-1 -> 1, step k -> 0, steps after k -> no label; k = -1 (all correct) -> all 1.
"""

from __future__ import annotations

import pytest
import torch

from actprm.model.labels import label_tensors, step_labels


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (-1, 3, [1.0, 1.0, 1.0]),  # all correct: every step is 1
        (0, 3, [0.0, None, None]),  # first step wrong: nothing after it is labelled
        (1, 4, [1.0, 0.0, None, None]),
        (2, 3, [1.0, 1.0, 0.0]),  # last step wrong: no step left unlabelled
        (-1, 0, []),  # no steps at all
        (0, 1, [0.0]),
    ],
)
def test_step_labels(k, n, expected):
    assert step_labels(k, n) == expected


@pytest.mark.parametrize("k, n", [(3, 3), (7, 3), (-2, 3), (0, 0)])
def test_step_labels_out_of_range_raises(k, n):
    # Valid indices are -1..n-1; anything else is a broken judgement, not a label.
    with pytest.raises(ValueError, match="out of range"):
        step_labels(k, n)


def test_label_tensors_masks_and_targets():
    # row 0: k=1, 3 steps scored -> [1, 0, -]        (pads to S=4)
    # row 1: k=-1, 2 steps       -> [1, 1]
    # row 2: k=0, 1 step         -> [0]
    targets, mask = label_tensors([1, -1, 0], [3, 2, 1], S=4)
    assert targets.shape == mask.shape == (3, 4)
    assert mask.dtype == torch.bool and targets.dtype == torch.float32
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, False, False, False],
    ]
    # Only masked entries matter; unmasked entries are 0 (never read by the loss).
    assert targets.tolist() == [
        [1.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]


def test_label_tensors_truncated_before_the_first_error_labels_all_kept_steps_1():
    # The judge saw 6 steps and put the error at k=4, but max_length kept only 2 steps
    # (n_scored = 2 < k + 1 = 5): both kept steps precede the error -> both labelled 1.
    targets, mask = label_tensors([4], [2], S=2)
    assert mask.tolist() == [[True, True]]
    assert targets.tolist() == [[1.0, 1.0]]
    # Edge: the error is exactly the first dropped step (k = n_scored = 2) -> still [1, 1].
    targets, mask = label_tensors([2], [2], S=3)
    assert mask.tolist() == [[True, True, False]]
    assert targets.tolist() == [[1.0, 1.0, 0.0]]


def test_label_tensors_truncated_after_the_first_error_keeps_the_zero():
    # k=1, 3 of 5 steps kept: [1, 0, -]; truncation after the error changes nothing.
    targets, mask = label_tensors([1], [3], S=3)
    assert mask.tolist() == [[True, True, False]]
    assert targets.tolist()[0][:2] == [1.0, 0.0]


def test_label_tensors_nothing_scored_gives_an_empty_mask():
    targets, mask = label_tensors([-1, 0], [0, 0], S=1)
    assert not mask.any()
    assert targets.shape == (2, 1)
