"""GSM8K worked solutions -> labelled trajectories: hand-worked slips and their consequences,
the safe evaluator, number formatting, determinism and the exact error share; the real file
when ../shared/data is there."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from actprm.model.data.records import DataError
from actprm.model.data.gsm8k_slips import (
    SlipError,
    Unreadable,
    apply_slip,
    correct_steps,
    evaluate,
    format_like,
    gsm8k_slips,
    parse_record,
    read_gsm8k,
    slip_record,
    slip_values,
)
from support.paths import SHARED_DATA

DATA = SHARED_DATA

NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
WENG = {
    "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
}
MOVIE = {  # thousands separators in the text, none in the annotations
    "question": "A movie makes $4500 a day for 5 days a week. How much does it make in 20 weeks?",
    "answer": "So he makes 4500*5=$<<4500*5=22500>>22,500\nHe makes 22,500*20=$<<22500*20=450000>>450,000\n#### 450000",
}


def _natalia(x: int) -> dict:
    """Natalia with another April count (even, so half of it is whole)."""
    h = x // 2
    return {"question": NATALIA["question"].replace("48", str(x)),
            "answer": f"Natalia sold {x}/2 = <<{x}/2={h}>>{h} clips in May.\n"
                      f"Natalia sold {x}+{h} = <<{x}+{h}={x + h}>>{x + h} clips altogether in April and May.\n#### {x + h}"}


# ---------------------------------------------------------------- hand-worked slips

def test_natalia_parses_to_steps_without_annotations():
    s = parse_record(NATALIA)
    assert correct_steps(s) == ["Natalia sold 48/2 = 24 clips in May.",
                                "Natalia sold 48+24 = 72 clips altogether in April and May.",
                                "The answer is 72."]
    assert [(st.expr, st.result) for st in s.steps] == [("48/2", 24), ("48+24", 72)]


def test_natalia_slip_in_step_0_carries_to_step_1_and_the_answer():
    steps = apply_slip(parse_record(NATALIA), 0, Fraction(25))
    assert steps == ["Natalia sold 48/2 = 25 clips in May.",
                     "Natalia sold 48+25 = 73 clips altogether in April and May.",
                     "The answer is 73."]


def test_natalia_slip_in_the_last_step_changes_only_it_and_the_answer():
    steps = apply_slip(parse_record(NATALIA), 1, Fraction(82))  # a wrong carry: 48+24 = 82
    assert steps == ["Natalia sold 48/2 = 24 clips in May.",
                     "Natalia sold 48+24 = 82 clips altogether in April and May.",
                     "The answer is 82."]


def test_decimal_slip_is_recomputed_exactly():
    steps = apply_slip(parse_record(WENG), 0, Fraction("0.3"))
    assert steps == ["Weng earns 12/60 = $0.3 per minute.",
                     "Working 50 minutes, she earned 0.3 x 50 = $15.",
                     "The answer is 15."]


def test_thousands_separators_are_kept():
    steps = apply_slip(parse_record(MOVIE), 0, Fraction(22510))
    assert steps == ["So he makes 4500*5=$22,510", "He makes 22,510*20=$450,200", "The answer is 450200."]


def test_a_value_also_in_the_question_is_ambiguous():
    record = {"question": NATALIA["question"] + " She kept 24 for herself.", "answer": NATALIA["answer"]}
    with pytest.raises(SlipError, match="appears earlier"):
        apply_slip(parse_record(record), 0, Fraction(25))
    # The last step's result is not in the question: that slip is made instead.
    k, steps = slip_record(parse_record(record), random.Random(0))
    assert k == 1 and steps[0] == "Natalia sold 48/2 = 24 clips in May." and steps[1] != correct_steps(parse_record(record))[1]


def test_a_changed_value_the_text_does_not_show_cannot_be_carried():
    record = {"question": "A has 40 red and 32 blue pens and gives half away. How many are left?",
              "answer": "A has 40+32 = <<40+32=72>>72 pens.\nHalf of that is <<72/2=36>>36 pens.\n#### 36"}
    with pytest.raises(SlipError, match="not visible"):
        apply_slip(parse_record(record), 0, Fraction(73))
    k, _ = slip_record(parse_record(record), random.Random(1))
    assert k == 1


def test_a_slip_that_does_not_reach_the_answer_is_not_made():
    record = {"question": "Tom has 2 and gets 3; Ann has 10 and gets 4. How many has Ann?",
              "answer": "Tom has 2+3 = <<2+3=5>>5.\nAnn has 10+4 = <<10+4=14>>14.\n#### 14"}
    with pytest.raises(SlipError, match="does not reach the final answer"):
        apply_slip(parse_record(record), 0, Fraction(6))
    assert slip_record(parse_record(record), random.Random(2))[0] == 1


def test_plain_lines_after_the_slip_follow_it():
    record = {"question": "Sam reads 12 pages a day for 3 days. How many pages?",
              "answer": "Sam reads 12*3 = <<12*3=36>>36 pages.\nSo Sam read 36 pages in total.\n#### 36"}
    steps = apply_slip(parse_record(record), 0, Fraction(38))
    assert steps == ["Sam reads 12*3 = 38 pages.", "So Sam read 38 pages in total.", "The answer is 38."]


def test_a_plain_line_that_computes_with_a_changed_value_is_not_rewritten():
    record = {"question": "Sam reads 12 pages a day for 3 days and 4 more. How many pages?",
              "answer": "Sam reads 12*3 = <<12*3=36>>36 pages.\nThen 36+4 = 40 pages.\n#### 40"}
    with pytest.raises(SlipError, match="without an annotation"):
        apply_slip(parse_record(record), 0, Fraction(38))


def test_unusable_records_name_their_reason():
    for obj, reason in ((["a list"], "not a JSON object"), ({"answer": "#### 1"}, "question"),
                        ({"question": "q", "answer": "1+1=2"}, "####"), ({"question": "q", "answer": "#### 2"}, "no solution steps"),
                        ({"question": "q", "answer": "x\n#### two"}, "not a number"), (Unreadable("not JSON (x)"), "not JSON")):
        with pytest.raises(SlipError, match=reason):
            parse_record(obj)
    no_annotation = parse_record({"question": "q", "answer": "It is 2.\n#### 2"})
    with pytest.raises(SlipError, match="no step with a usable calculator annotation"):
        slip_record(no_annotation, random.Random(0))


def test_slip_values_are_small_realistic_and_positive():
    assert slip_values(Fraction(24)) == [25, 23, 26, 22, 34, 14]
    assert slip_values(Fraction(1)) == [2, 3]  # never 0 or negative
    assert slip_values(Fraction("0.2")) == [Fraction("0.3"), Fraction("0.1"), Fraction("0.4")]
    assert Fraction(450100) in slip_values(Fraction(450000))


# ---------------------------------------------------------------- evaluator and formatting

def test_safe_evaluator_does_arithmetic_exactly():
    assert evaluate("48/2") == 24
    assert evaluate("0.2*50") == 10  # exactly, not 10.000000000000002
    assert evaluate("-(3+4)*2") == -14
    assert evaluate("20000*.8") == 16000
    assert evaluate("10/3") == Fraction(10, 3)


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "x+1", "abs(-1)", "2**3", "().__class__",
                                  "1 if 1 else 2", "'a'*3", "[1][0]", "1/0", "1;2", "", "True+1"])
def test_safe_evaluator_refuses_anything_else(expr):
    with pytest.raises(ValueError):
        evaluate(expr)


def test_numbers_are_written_in_the_style_of_the_original():
    assert format_like(Fraction(25), "24") == "25"
    assert format_like(Fraction(21, 2), "10") == "10.5"
    assert format_like(Fraction(333199), "333,200.00") == "333,199.00"
    assert format_like(Fraction(450200), "450,000") == "450,200"
    assert format_like(Fraction(999), "1,000") == "999"
    assert format_like(Fraction(4, 5), ".8") == ".8"
    assert format_like(Fraction(3, 10), "0.2") == "0.3"
    assert format_like(Fraction(73, 3), "24") is None  # no short decimal form


# ---------------------------------------------------------------- a data set

def _items(n: int) -> list:
    return [_natalia(2 * (10 + i)) for i in range(n)]


def test_exact_error_share_and_labels():
    result = gsm8k_slips(_items(40), 20, seed=3, error_rate=0.3)
    assert len(result.records) == 20
    errors = [r for r in result.records if r.label != -1]
    assert len(errors) == 6
    assert {r.extra["kind"] for r in errors} == {"arithmetic_propagated"}
    for r in result.records:
        original = correct_steps(parse_record(_items(40)[r.extra["gsm8k_index"]]))
        assert r.extra["source"] == "gsm8k-slips" and r.id == f"gsm8k-{r.extra['gsm8k_index']}"
        if r.label == -1:
            assert r.steps == original and r.extra["kind"] == "correct" and r.extra["final_answer_correct"]
        else:
            assert r.steps[: r.label] == original[: r.label] and r.steps[r.label] != original[r.label]
            assert r.steps[-1] != original[-1] and not r.extra["final_answer_correct"]


def test_deterministic_from_n_and_seed():
    def key(res):
        return [(r.id, r.steps, r.label) for r in res.records]

    assert key(gsm8k_slips(_items(40), 20, seed=1)) == key(gsm8k_slips(_items(40), 20, seed=1))
    assert key(gsm8k_slips(_items(40), 20, seed=1)) != key(gsm8k_slips(_items(40), 20, seed=2))


def test_unusable_records_are_skipped_and_counted():
    items = _items(10) + [Unreadable("not JSON (Expecting value)"), {"question": "q"}, 7]
    result = gsm8k_slips(items, 10, seed=0, error_rate=0.5)
    assert len(result.records) == 10 and sum(result.skipped.values()) == 3
    assert result.skipped["not JSON (Expecting value)"] == 1 and result.skipped["no 'answer' text"] == 1


def test_running_out_of_records_and_bad_arguments_are_clear_errors():
    with pytest.raises(DataError, match="only 3 of 5 trajectories"):
        gsm8k_slips(_items(3), 5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        gsm8k_slips(_items(3), 0)
    with pytest.raises(ValueError, match="error rate"):
        gsm8k_slips(_items(3), 2, error_rate=1.5)


def test_read_gsm8k_keeps_bad_lines_in_place(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(NATALIA) + "\n{broken\n\n" + json.dumps(WENG) + "\n")
    items = read_gsm8k(path)
    assert len(items) == 3 and isinstance(items[1], Unreadable) and items[2] == WENG
    for text, message in (("", "empty file"), ("{x\n{y\n", "not JSON Lines"), ('[{"question": "q"}]', "JSON array")):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_gsm8k(path)
    with pytest.raises(DataError, match="does not exist"):
        read_gsm8k(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- the real file

@pytest.mark.data
def test_real_gsm8k_train():
    path = DATA / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"real data absent: {path} (../shared/data next to the checkout)")
    items = read_gsm8k(path)
    result = gsm8k_slips(items, 300, seed=0)
    assert sum(r.label != -1 for r in result.records) == 150
    # Most records take a consistent slip; the ones that do not are counted, never dropped silently.
    assert sum(result.skipped.values()) < 100
    for r in result.records:
        original = correct_steps(parse_record(items[r.extra["gsm8k_index"]]))
        assert not any("<<" in s or ">>" in s for s in r.steps)
        assert r.steps[-1].startswith("The answer is ") and len(r.steps) == len(original)
        if r.label != -1:
            assert r.steps[: r.label] == original[: r.label] and r.steps[r.label] != original[r.label]
        else:
            assert r.steps == original
