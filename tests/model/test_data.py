"""Loading labelled records: small constructed files, every skip reason, the real ProcessBench."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from actprm.model.data.records import DataError, LoadResult, Record, load_records, skip_reasons
from support.paths import SHARED_DATA

DATA = SHARED_DATA


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _pb(id, steps, label, **kw):
    return {"id": id, "generator": "g", "problem": f"problem {id}", "steps": steps,
            "final_answer_correct": label == -1, "label": label, **kw}


def _reasons(result: LoadResult) -> dict[str, str]:
    return dict(result.skipped)


# ---------------------------------------------------------------- ProcessBench JSON


def test_processbench_good_records_and_extra(tmp_path):
    p = _write_json(tmp_path / "pb.json", [_pb("a", ["s0", "s1"], 1), _pb("b", ["s0"], -1)])
    r = load_records(p)
    assert r.skipped == []
    assert r.records == [
        Record("a", "problem a", ["s0", "s1"], 1, {"generator": "g", "final_answer_correct": False}),
        Record("b", "problem b", ["s0"], -1, {"generator": "g", "final_answer_correct": True}),
    ]
    assert load_records(p, format="processbench").records == r.records


def test_processbench_every_skip_reason_counted(tmp_path):
    items = [
        _pb("ok1", ["s0", "s1", "s2"], 2),
        {"id": "nosteps", "problem": "p", "label": -1},
        _pb("empty", [], -1),
        _pb("nonstr", ["s0", 3], 0),
        _pb("notlist", "s0 s1", 0),
        _pb("high", ["s0", "s1"], 2),  # label == len(steps)
        _pb("low", ["s0", "s1"], -2),
        _pb("strlabel", ["s0"], "0"),
        _pb("boollabel", ["s0"], True),  # JSON true must not pass as label 1
        {"id": "nolabel", "problem": "p", "steps": ["s0"]},
        {"id": "noproblem", "steps": ["s0"], "label": -1},
        42,
        _pb("ok1", ["s0"], -1),  # duplicate id
        _pb("ok2", ["s0"], 0),
    ]
    r = load_records(_write_json(tmp_path / "pb.json", items))
    assert [x.id for x in r.records] == ["ok1", "ok2"]
    assert len(r.skipped) == len(items) - 2  # each bad record counted once
    why = _reasons(r)
    assert "no steps" in why["nosteps"]
    assert "no steps (empty list)" == why["empty"]
    assert "step 1 is a int" in why["nonstr"]
    assert "not a list" in why["notlist"]
    assert "label 2 out of range for 2 steps" in why["high"]
    assert "label -2 out of range" in why["low"]
    assert "not an integer" in why["strlabel"]
    assert "not an integer" in why["boollabel"]
    assert "no label" in why["nolabel"]
    assert "no problem text" in why["noproblem"]
    assert "not a JSON object" in why["item 11"]  # no id: named by position
    assert why["ok1"] == "duplicate id"


# ---------------------------------------------------------------- JSONL


def test_jsonl_with_gold_first_error_blank_and_bad_lines(tmp_path):
    lines = [
        {"id": "a", "problem": "p", "steps": ["x", "y"], "gold_first_error": 1, "generator": "g"},
        "",
        "{not json",
        {"id": 7, "problem": "p", "steps": ["x"], "label": -1},  # numeric id kept as a string
        {"problem": "p", "steps": ["x"], "label": 0},  # no id: one is made from the line number
        {"id": "bad", "problem": "p", "steps": ["x"], "gold_first_error": 1},
        "[1, 2]",
    ]
    p = _write_jsonl(tmp_path / "mine.jsonl", lines)
    r = load_records(p)
    assert [(x.id, x.label) for x in r.records] == [("a", 1), ("7", -1), ("mine:line-5", 0)]
    assert r.records[0].extra == {"generator": "g"}
    assert r.skipped == [
        ("line 3", "not JSON (Expecting property name enclosed in double quotes)"),
        ("bad", "label 1 out of range for 1 steps (must be -1..0)"),
        ("line 7", "not a JSON object (a list)"),
    ]
    assert load_records(p, format="jsonl").records == r.records


# ---------------------------------------------------------------- whole-file errors


def _one_line_error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_records(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg  # printable by a CLI as is
    return msg


def test_file_errors_are_one_line_and_name_the_file(tmp_path):
    assert "does not exist" in _one_line_error(tmp_path / "missing.json")
    assert "not a regular file" in _one_line_error(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    assert "not JSON" in _one_line_error(bad)
    assert "expected a JSON array" in _one_line_error(_write_json(tmp_path / "obj.json", {"a": 1}))
    assert "no usable record (0 skipped)" in _one_line_error(_write_json(tmp_path / "empty.json", []))
    msg = _one_line_error(_write_json(tmp_path / "allbad.json", [_pb("a", [], -1), _pb("b", ["s"], 5)]))
    assert "no usable record (2 skipped; first reason: a: no steps (empty list))" in msg
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text("nope\n\nstill nope\n", encoding="utf-8")
    assert "not JSON Lines" in _one_line_error(allbad)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    assert "empty file" in _one_line_error(blank)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00[")
    assert "not UTF-8" in _one_line_error(binary)
    assert "unknown format" in _one_line_error(bad, format="csv")
    # forcing the array format on a JSONL file is "not JSON", not a crash
    jl = _write_jsonl(tmp_path / "two.jsonl", [_pb("a", ["s"], -1), _pb("b", ["s"], -1)])
    assert "not JSON" in _one_line_error(jl, format="processbench")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- PRMBench


def _prm(idx, **kw):
    base = {
        "original_question": "orig q",
        "modified_question": "mod q",
        "original_process": ["1. a", "2. b", "3. c"],
        "modified_process": ["1. a", "2. B", "3. C", "4. D"],
        "modified_steps": [2, 3, 4],  # step NUMBERS in the official data, not texts
        "error_steps": [3, 2],
        "reason": "why",
        "idx": idx,
        "question": "q",
        "classification": "circular",
    }
    base.update(kw)
    return base


def test_prmbench_official_layout(tmp_path):
    items = [
        _prm("m1"),
        _prm("none", error_steps=[]),
        {"idx": "orig", "original_question": "oq", "original_process": ["x", "y"], "error_steps": [],
         "classification": "correct"},
        {"id": "texts", "question": "q", "modified_steps": ["u", "v"], "error_steps": [2],
         "classification": "counterfactual"},
        _prm("range", error_steps=[5]),
        _prm("zero", error_steps=[0]),
        _prm("noerr", error_steps=None),
        _prm("badstep", modified_process=["ok", None]),
        {"idx": "nothing", "question": "q", "modified_steps": [1, 2], "error_steps": [1]},
    ]
    for path in (_write_jsonl(tmp_path / "prm.jsonl", items), _write_json(tmp_path / "prm.json", items)):
        r = load_records(path)  # auto: the records carry error_steps
        assert load_records(path, format="prmbench").records == r.records
        recs = {x.id: x for x in r.records}
        # ids are <classification>_<idx>: the official release numbers records within a class
        assert list(recs) == ["circular_m1", "circular_none", "correct_orig", "counterfactual_texts"]
        m1 = recs["circular_m1"]
        # error_steps [3, 2] (1-based) -> [1, 2] (0-based, sorted); first error 1
        assert (m1.problem, m1.steps, m1.label) == ("mod q", ["1. a", "2. B", "3. C", "4. D"], 1)
        assert m1.extra == {"error_steps": [1, 2], "classification": "circular",
                            "source": "modified_process", "reason": "why"}
        assert (recs["circular_none"].label, recs["circular_none"].extra["error_steps"]) == (-1, [])
        orig = recs["correct_orig"]
        assert (orig.problem, orig.steps, orig.label, orig.extra["source"]) == ("oq", ["x", "y"], -1, "original_process")
        texts = recs["counterfactual_texts"]
        assert (texts.steps, texts.label, texts.extra["error_steps"]) == (["u", "v"], 1, [1])
        why = _reasons(r)
        assert len(r.skipped) == 5
        assert "error step 5 out of range for 4 steps" in why["circular_range"]
        assert "error step 0 out of range" in why["circular_zero"]
        assert "'error_steps' missing or not a list" == why["circular_noerr"]
        assert "step 1 is a NoneType" in why["circular_badstep"]
        assert why["nothing"].startswith("no steps")


def test_prmbench_classes_share_idx_values_and_redundency_yields_the_correct_samples(tmp_path):
    # The official release numbers idx within each class: three classes of 90 records share
    # idx 0..89. All 270 are distinct records; nothing is a duplicate.
    classes = ("circular", "confidence", "counterfactual")
    items = [_prm(i, classification=c) for c in classes for i in range(90)]
    items += [_prm(i, classification="redundency") for i in range(3)]
    items += [_prm(1, classification="circular"), _prm(7, classification="circular", error_steps=[9])]
    r = load_records(_write_jsonl(tmp_path / "prm.jsonl", items))
    by_class = Counter(x.extra["classification"] for x in r.records)
    assert by_class == {"circular": 90, "confidence": 90, "counterfactual": 90, "redundency": 3, "correct": 3}
    assert "circular_5" in {x.id for x in r.records} and "confidence_5" in {x.id for x in r.records}
    # The correct samples are built from the original question and process, as the official evaluation does.
    correct = next(x for x in r.records if x.id == "correct_2")
    assert (correct.problem, correct.steps, correct.label) == ("orig q", ["1. a", "2. b", "3. c"], -1)
    assert correct.extra == {"error_steps": [], "classification": "correct", "source": "original_process"}
    # Only a real repeat of (classification, idx) is a duplicate; reasons are counted by kind.
    assert r.skipped == [("circular_1", "duplicate id"), ("circular_7", "error step 9 out of range for 4 steps (1-based: 1..4)")]
    assert skip_reasons(r.skipped) == {"duplicate id": 1, "error step N out of range for N steps (1-based: N..N)": 1}


def test_auto_detection(tmp_path):
    # a .json array of ProcessBench records stays ProcessBench even with an extra field
    pb = _write_json(tmp_path / "a.json", [_pb("a", ["s"], -1, error_steps=[])])
    assert load_records(pb).records[0].extra["error_steps"] == []
    # a .jsonl of ProcessBench fields is JSONL
    jl = _write_jsonl(tmp_path / "b.jsonl", [_pb("a", ["s"], 0)])
    assert load_records(jl).records[0].label == 0
    # a JSON array saved under .jsonl still loads
    arr = _write_json(tmp_path / "c.jsonl", [_pb("a", ["s"], 0)])
    assert load_records(arr).records[0].id == "a"
    # JSON Lines saved under .json (several JSON values) is read line by line
    lines = _write_jsonl(tmp_path / "d.json", [_pb("a", ["s"], 0), _pb("b", ["s"], -1)])
    assert [x.id for x in load_records(lines).records] == ["a", "b"]


# ---------------------------------------------------------------- real ProcessBench


@pytest.mark.data
@pytest.mark.parametrize("split, n, n_error", [("gsm8k", 400, 207), ("math", 1000, 594)])
def test_real_processbench(split, n, n_error):
    path = DATA / "processbench" / f"{split}.json"
    if not path.exists():
        pytest.skip(f"real data absent: {path} (../shared/data next to the checkout)")
    r = load_records(path)
    assert r.skipped == []
    assert len(r.records) == n
    assert sum(x.label != -1 for x in r.records) == n_error
    assert len({x.id for x in r.records}) == n
    assert all(x.steps and "generator" in x.extra for x in r.records)
