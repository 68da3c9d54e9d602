"""The verdict parser on real answers of a real model (tests/model/fixtures/judge_outputs/*.json,
recorded by make_fixtures.py from SmolLM2-135M-Instruct behind `transformers serve`).

Each recorded answer says what it must parse to (`expect`: an index, or "unparseable") and
why (`why`, read by a person). The point is that nothing a real small model writes (an echo
of its instruction, an answer cut at max_tokens, a box per paragraph, <think> reasoning)
becomes a label it never gave.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actprm.model.judges.base import JudgeError

from actprm.model.judges.verdict import parse_verdict

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "judge_outputs").glob("*.json"))
ANSWERS = [(path.stem, i, a) for path in FIXTURES for i, a in enumerate(json.loads(path.read_text()))]


def outcome(answer: dict) -> int | str:
    try:
        return parse_verdict(answer["content"], answer["n_steps"], answer["finish_reason"])
    except JudgeError as err:
        assert not err.retryable and err.reason.startswith("unparseable judge answer")
        return "unparseable"


@pytest.mark.parametrize("source, index, answer", ANSWERS, ids=[f"{s}-{i}-{a['variant']}" for s, i, a in ANSWERS])
def test_a_real_answer_parses_to_what_a_reader_says_it_means(source, index, answer):
    assert outcome(answer) == answer["expect"], answer["why"]


def test_the_fixtures_hold_every_kind_of_answer_a_parser_must_survive():
    kinds = {a["kind"] for _, _, a in ANSWERS}
    assert {"echo", "truncated", "several_boxes", "no_verdict"} <= kinds, kinds


def test_no_echo_and_no_truncation_is_ever_a_label():
    for _, _, a in ANSWERS:
        if a["kind"] in ("echo", "truncated"):
            assert outcome(a) == "unparseable", a["content"][-200:]


def test_a_cut_answer_is_refused_even_when_the_server_does_not_say_it_was_cut():
    for _, _, a in ANSWERS:
        if a["finish_reason"] == "length":
            with pytest.raises(JudgeError):
                parse_verdict(a["content"], a["n_steps"], None)


def test_a_box_per_line_is_no_verdict_even_cut_back_to_its_last_whole_line():
    # The last line whole ("... \boxed{1}") would read as verdict 1 if only the last box counted.
    several = [a for _, _, a in ANSWERS if a["kind"] == "several_boxes"]
    assert several
    for a in several:
        whole = a["content"].rstrip().rsplit("\n", 1)[0].rstrip()
        assert whole.endswith("}")
        with pytest.raises(JudgeError, match="boxes disagree"):
            parse_verdict(whole, a["n_steps"], "stop")
