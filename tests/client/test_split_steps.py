"""Splitting a raw response into steps, and Trajectory messages that carry `response` text."""

from __future__ import annotations

import json
import re

import pytest

from actprm.client.steps import StepSplitError, check_split_mode, split_steps
from actprm.client import messages
from actprm.client.messages import MAX_STEPS, MessageError, Trajectory


def test_default_split_is_a_blank_line_and_strips_steps():
    assert split_steps("Step 1: 2+2=4\n\n  Step 2: so 4  \n\n\n\nThe answer is 4\n") == [
        "Step 1: 2+2=4", "Step 2: so 4", "The answer is 4"]


def test_lines_mode_and_literal_separators():
    assert split_steps("a\nb\r\n\nc", "lines") == ["a", "b", "c"]
    assert split_steps("a ки b ки c", " ки ") == ["a", "b", "c"]


def test_regex_mode_splits_on_matches_even_with_groups():
    text = "Step 1: x\nStep 2: y\nStep 3: z"
    assert split_steps(text, r"re:\n(?=Step \d+:)") == ["Step 1: x", "Step 2: y", "Step 3: z"]
    # A capturing group must not leak the separator into the steps (re.split would).
    assert split_steps("a<s>b<s>c", "re:(<s>)") == ["a", "b", "c"]


@pytest.mark.parametrize("text, mode, reason", [
    ("", "\n\n", "empty or whitespace only"),
    ("  \n\n \n", "\n\n", "empty or whitespace only"),
    ("a\n\nb", "", "must not be empty"),
    ("a\n\nb", "re:(", "is invalid"),
    ("a\n\nb", "re:x*", "matches the empty string"),
    (5, "\n\n", "must be a string"),
])
def test_bad_input_has_a_clear_reason(text, mode, reason):
    with pytest.raises(StepSplitError, match=reason):
        split_steps(text, mode)


def test_limits():
    with pytest.raises(StepSplitError, match="splits into 4 steps, over the limit of 3"):
        split_steps("a\n\nb\n\nc\n\nd", max_steps=3)
    with pytest.raises(StepSplitError, match="11 characters, over the limit of 10"):
        split_steps("a" * 11, max_chars=10)
    assert check_split_mode("lines") == "lines"
    with pytest.raises(StepSplitError):
        check_split_mode("re:")


def _decode(obj: dict) -> Trajectory:
    return messages.decode(Trajectory, json.dumps(obj).encode())


def test_a_trajectory_may_carry_response_text_and_decodes_with_steps():
    t = _decode({"id": "a", "problem": "2+2?", "response": "2+2=4\n\nSo 4.", "gold_first_error": 1})
    assert t.steps == ["2+2=4", "So 4."] and t.gold_first_error == 1
    # Re-encoded it is a plain steps message: one schema, and a re-read needs no second split.
    assert "response" not in json.loads(messages.encode(t)) and _decode(json.loads(messages.encode(t))) == t
    assert _decode({"id": "b", "problem": "p", "response": "x\ny", "split": "lines"}).steps == ["x", "y"]


@pytest.mark.parametrize("obj, reason", [
    ({"id": "a", "problem": "p"}, "give steps (a list of strings) or response"),
    ({"id": "a", "problem": "p", "steps": ["x"], "response": "x"}, "not both"),
    ({"id": "a", "problem": "p", "steps": ["x"], "split": "lines"}, "split applies to response only"),
    ({"id": "a", "problem": "p", "response": "x", "split": 3}, "split must be a string"),
    ({"id": "a", "problem": "p", "response": "\n\n".join(["s"] * (MAX_STEPS + 1))}, f"over the limit of {MAX_STEPS}"),
    ({"id": "a", "problem": "p", "response": "x\n\ny", "gold_first_error": 5}, "gold_first_error=5"),
])
def test_bad_response_messages_are_refused_with_the_reason(obj, reason):
    with pytest.raises(MessageError, match=re.escape(reason)):
        _decode(obj)
