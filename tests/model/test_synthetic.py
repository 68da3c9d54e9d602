"""Synthetic streams: determinism, exact shares, and labels recomputed from the text."""

from __future__ import annotations

import operator
import re
from collections import Counter

import pytest

from actprm.model.data.synthetic import (
    EASY_BAD,
    EASY_OK,
    HARD_BAD,
    HARD_OK,
    DEFAULT_KINDS,
    KINDS,
    hard_minority_pool,
    marker_trajectories,
    parse_kinds,
    word_problems,
)

_STEP = re.compile(r"^(?P<text>[A-Z][a-z]+ .+): (?P<x>\d+) (?P<op>[-+*/]) (?P<a>\d+) = (?P<y>\d+)\.$")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_KIND = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


# ---------------------------------------------------------------- word problems

ALL_KINDS = {k: 0.25 for k in KINDS}
_NAME_OF = {v: k for k, v in _KIND.items()}


def test_word_problems_deterministic_and_seeded():
    a = word_problems(50, seed=7)
    assert a == word_problems(50, seed=7)
    assert a != word_problems(50, seed=8)
    assert [r.id for r in a[:3]] == ["wp-7-0", "wp-7-1", "wp-7-2"]


def test_each_error_kind_is_what_its_name_says_and_later_steps_follow_it():
    records = word_problems(400, seed=3, kinds=ALL_KINDS, error_rate=0.6, min_steps=2, max_steps=8)
    for r in records:
        kind = r.extra["kind"]
        assert (kind == "correct") == (r.label == -1)
        start = int(re.match(r"^[A-Z][a-z]+ has (\d+) ", r.problem).group(1))
        *op_steps, final = r.steps
        assert 1 <= len(op_steps) <= 7 and -1 <= r.label < len(op_steps)
        value = true = start
        for j, step in enumerate(op_steps):
            m = _STEP.match(step)
            assert m, step
            x, a, y, sym = int(m["x"]), int(m["a"]), int(m["y"]), m["op"]
            words_op, words_a = r.extra["ops"][j]  # what the words say (also in the problem)
            here = j == r.label
            assert (x != value) == (here and kind == "carry_over"), (r.id, j, step)
            assert (a != words_a) == (here and kind == "misread"), (r.id, j, step)
            assert (_NAME_OF[sym] != words_op) == (here and kind == "wrong_operation"), (r.id, j, step)
            assert (y != _OPS[sym](x, a)) == (here and kind == "arithmetic"), (r.id, j, step)
            if sym == "/":
                assert x % a == 0, step  # divisions are exact
            assert y >= 1
            phrase = m["text"].split(" ", 1)[1]
            assert phrase in r.problem, (phrase, r.problem)
            value = y
            true = _OPS[_KIND[words_op]](true, words_a)
        assert final == f"The answer is {value}."
        assert r.extra["stated_answer"] == value and r.extra["answer"] == true
        # an error never cancels out: the stated answer is wrong exactly when there is an error
        assert (value != true) == (r.label != -1)


def test_kind_shares_are_exact_with_rare_fallbacks_said():
    records = word_problems(400, seed=1, kinds={"carry_over": 0.5, "misread": 0.25, "wrong_operation": 0.25})
    counts = Counter(r.extra["kind"] for r in records)
    assert counts["correct"] == 200
    # a kind the numbers do not allow at the chosen step becomes an arithmetic slip, and says so
    assert counts["arithmetic"] <= 12
    assert abs(counts["carry_over"] - 100) <= 12 and abs(counts["misread"] - 50) <= 12
    assert abs(counts["wrong_operation"] - 50) <= 12
    assert {r.extra["kind"] for r in word_problems(40, seed=2)} <= set(DEFAULT_KINDS) | {"correct", "arithmetic"}


def test_error_share_step_bounds_and_positions():
    records = word_problems(101, seed=0, error_rate=0.3, min_steps=4, max_steps=5)
    assert sum(r.label != -1 for r in records) == round(101 * 0.3)
    assert all(4 <= len(r.steps) <= 5 for r in records)
    assert all(r.label == -1 for r in word_problems(20, error_rate=0.0))
    assert all(r.label != -1 for r in word_problems(20, error_rate=1.0))
    assert word_problems(0) == []
    assert len({r.label for r in word_problems(200, seed=1, error_rate=1.0)}) >= 5


def test_word_problem_text_is_varied():
    records = word_problems(200, seed=0)
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
        ({"n": 3, "kinds": {"typo": 1.0}}, "unknown error kind"),
    ],
)
def test_word_problems_reject_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        word_problems(**kw)


def test_parse_kinds():
    assert parse_kinds("carry_over=3,misread=1") == {"carry_over": 0.75, "misread": 0.25}
    assert parse_kinds("carry_over, misread") == {"carry_over": 0.5, "misread": 0.5}
    for bad, msg in (("typo=1", "unknown error kind"), ("misread=x", "must be a number"), ("misread=0", "no error kind"),
                     ("", "no error kind"), ("misread=-1", ">= 0")):
        with pytest.raises(ValueError, match=msg):
            parse_kinds(bad)


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
