"""Synthetic streams: determinism, exact shares, and labels recomputed from the text."""

from __future__ import annotations

import operator
import re

import pytest

from actprm.model.synthetic import (
    EASY_BAD,
    EASY_OK,
    HARD_BAD,
    HARD_OK,
    arithmetic_trajectories,
    hard_minority_pool,
    marker_trajectories,
)

_STEP = re.compile(r"^(?P<text>[A-Z][a-z]+ .+): (?P<x>\d+) (?P<op>[-+*/]) (?P<a>\d+) = (?P<y>\d+)\.$")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_KIND = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_deterministic_and_seeded():
    a = arithmetic_trajectories(50, seed=7)
    assert a == arithmetic_trajectories(50, seed=7)
    assert a != arithmetic_trajectories(50, seed=8)
    assert [r.id for r in a[:3]] == ["syn-7-0", "syn-7-1", "syn-7-2"]


def test_arithmetic_labels_recomputed_from_text():
    records = arithmetic_trajectories(300, seed=3, error_rate=0.5, min_steps=2, max_steps=8)
    for r in records:
        start = int(re.match(r"^[A-Z][a-z]+ has (\d+) ", r.problem).group(1))
        *op_steps, final = r.steps
        assert 1 <= len(op_steps) <= 7
        assert -1 <= r.label < len(op_steps)  # errors are injected into operation steps
        value = start  # the value the solution carries forward
        true = start  # the right value
        for j, step in enumerate(op_steps):
            m = _STEP.match(step)
            assert m, step
            x, a, y, sym = int(m["x"]), int(m["a"]), int(m["y"]), m["op"]
            # the step continues from the previous stated result (consistent after an error)
            assert x == value, (r.id, j, step)
            assert [{v: k for k, v in _KIND.items()}[sym], a] == r.extra["ops"][j]
            if sym == "/":
                assert x % a == 0, step  # divisions are exact
            right = _OPS[sym](x, a)
            if j == r.label:
                assert y != right, (r.id, step)  # the labelled step is wrong
            else:
                assert y == right, (r.id, step)  # every other step's arithmetic is right
            assert y >= 1
            # the operation is described in the problem, in the same words
            phrase = m["text"].split(" ", 1)[1]
            assert phrase in r.problem, (phrase, r.problem)
            value = y
            true = _OPS[sym](true, a)
        assert final == f"The answer is {value}."
        assert r.extra["stated_answer"] == value
        assert r.extra["answer"] == true
        # an error never cancels out: the stated answer is wrong exactly when there is an error
        assert (value != true) == (r.label != -1)


def test_arithmetic_exact_error_share_and_step_bounds():
    records = arithmetic_trajectories(101, seed=0, error_rate=0.3, min_steps=4, max_steps=5)
    assert sum(r.label != -1 for r in records) == round(101 * 0.3)
    assert all(4 <= len(r.steps) <= 5 for r in records)
    assert all(r.label == -1 for r in arithmetic_trajectories(20, error_rate=0.0))
    assert all(r.label != -1 for r in arithmetic_trajectories(20, error_rate=1.0))
    assert arithmetic_trajectories(0) == []
    # errors land at varied positions, not always the first step
    positions = {r.label for r in arithmetic_trajectories(200, seed=1, error_rate=1.0)}
    assert len(positions) >= 5


def test_arithmetic_text_is_varied():
    records = arithmetic_trajectories(200, seed=0)
    assert len({r.problem for r in records}) == 200
    assert len({r.problem.split(" ", 1)[0] for r in records}) >= 10  # names
    assert len({re.search(r"How many (.+) does", r.problem).group(1) for r in records}) >= 10  # objects
    symbols = {m["op"] for r in records for s in r.steps[:-1] if (m := _STEP.match(s))}
    assert symbols == {"+", "-", "*", "/"}


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"n": -1}, "n must be"),
        ({"n": 3, "error_rate": 1.5}, "error_rate"),
        ({"n": 3, "min_steps": 1}, "min_steps"),
        ({"n": 3, "min_steps": 5, "max_steps": 4}, "min_steps"),
    ],
)
def test_arithmetic_rejects_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        arithmetic_trajectories(**kw)


# ---------------------------------------------------------------- marker task


def _first_marked(steps: list[str], bad: str) -> int:
    return next((i for i, s in enumerate(steps) if s.split()[-1] == bad), -1)


def test_marker_label_is_visible_and_short():
    records = marker_trajectories(200, seed=5, error_rate=0.4)
    assert records == marker_trajectories(200, seed=5, error_rate=0.4)
    assert sum(r.label != -1 for r in records) == 80
    for r in records:
        assert r.label == _first_marked(r.steps, EASY_BAD)
        for j, s in enumerate(r.steps):
            assert s in (f"step {j} {EASY_OK}", f"step {j} {EASY_BAD}")
            assert s.isascii() and len(s) <= 12  # one byte per token: keep sequences tiny
        assert 2 <= len(r.steps) <= 6
    assert r.id.startswith("mark-5-")
    # steps after the first bad one are not all "ok": the model must only look up to the label
    after = [s for r in records if r.label != -1 for s in r.steps[r.label + 1 :]]
    assert any(s.endswith(EASY_BAD) for s in after) and any(s.endswith(EASY_OK) for s in after)


# ---------------------------------------------------------------- hard-minority pool


def test_hard_minority_pool_structure():
    pool = hard_minority_pool(500, seed=2, hard_share=0.2)
    assert pool == hard_minority_pool(500, seed=2, hard_share=0.2)
    hard = [r for r in pool if r.extra["kind"] == "hard"]
    easy = [r for r in pool if r.extra["kind"] == "easy"]
    assert len(hard) == 100 and len(easy) == 400
    # each kind carries the requested error share exactly
    assert sum(r.label != -1 for r in hard) == 50
    assert sum(r.label != -1 for r in easy) == 200
    # hard records are spread through the pool, not bunched at one end
    positions = [i for i, r in enumerate(pool) if r.extra["kind"] == "hard"]
    assert positions[0] < 50 and positions[-1] > 450
    for r in easy:
        assert r.label == _first_marked(r.steps, EASY_BAD)
    for r in hard:
        assert r.label == _first_marked(r.steps, HARD_BAD)
        assert all(s.split()[-1] in (HARD_OK, HARD_BAD) for s in r.steps)


def test_hard_minority_needs_its_own_labels():
    """A reader that only knows the easy markers is perfect on easy records and learns nothing
    about hard ones: every hard error is missed. So the labels a selector spends on hard
    records decide the hard-record accuracy."""
    pool = hard_minority_pool(300, seed=0)
    easy_chars = set("".join(s for r in pool if r.extra["kind"] == "easy" for s in r.steps))
    assert not set(HARD_OK + HARD_BAD) & easy_chars  # the hard markers are unseen letters
    assert sorted(HARD_OK) == sorted(HARD_BAD)  # they differ only in order: subtler
    for r in pool:
        easy_reader = _first_marked(r.steps, EASY_BAD)
        if r.extra["kind"] == "easy":
            assert easy_reader == r.label
        else:
            assert easy_reader == -1
    assert any(r.extra["kind"] == "hard" and r.label != -1 for r in pool)


def test_hard_minority_pool_edge_shares():
    assert all(r.extra["kind"] == "easy" for r in hard_minority_pool(10, seed=0, hard_share=0.0))
    assert all(r.extra["kind"] == "hard" for r in hard_minority_pool(10, seed=0, hard_share=1.0))
    with pytest.raises(ValueError, match="hard_share"):
        hard_minority_pool(10, seed=0, hard_share=-0.1)
