"""`actprm data synthetic` and `actprm data gsm8k-slips` through typer's CliRunner: the files
they write read back with load_records, the summary line, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from actprm.daemon.cli.main import app
from actprm.model.data.records import Record, load_records, save_processbench
from support.paths import SHARED_DATA

DATA = SHARED_DATA


@pytest.fixture
def invoke():
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, ["data", *args])
    structlog.reset_defaults()  # the app callback pointed structlog at CliRunner's (now closed) stderr


def _gsm8k_file(path: Path, n: int = 30) -> Path:
    lines = []
    for i in range(n):
        x = 2 * (10 + i)
        h = x // 2
        lines.append(json.dumps({
            "question": f"Natalia sold clips to {x} of her friends in April, and then she sold half as many clips "
                        "in May. How many clips did Natalia sell altogether in April and May?",
            "answer": f"Natalia sold {x}/2 = <<{x}/2={h}>>{h} clips in May.\n"
                      f"Natalia sold {x}+{h} = <<{x}+{h}={x + h}>>{x + h} clips altogether in April and May.\n#### {x + h}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_synthetic_writes_processbench_json(invoke, tmp_path):
    out = tmp_path / "syn.json"
    got = invoke("synthetic", "--n", "40", "--seed", "3", "--kinds", "carry_over=0.5,misread=0.5",
                 "--error-rate", "0.25", "--out", str(out))
    assert got.exit_code == 0, got.output
    assert got.stderr.startswith(f"wrote 40 trajectories to {out} (10 with an error, 30 correct;")
    items = json.loads(out.read_text())
    assert {"id", "generator", "problem", "steps", "final_answer_correct", "label", "kind"} <= set(items[0])
    loaded = load_records(out)
    assert loaded.skipped == [] and len(loaded.records) == 40
    assert sum(r.label != -1 for r in loaded.records) == 10
    assert {r.extra["kind"] for r in loaded.records if r.label == -1} == {"correct"}
    # The same (n, seed) writes the same file.
    again = tmp_path / "again.json"
    assert invoke("synthetic", "--n", "40", "--seed", "3", "--kinds", "carry_over=0.5,misread=0.5",
                  "--error-rate", "0.25", "--out", str(again)).exit_code == 0
    assert again.read_text() == out.read_text()


def test_gsm8k_slips_writes_processbench_json(invoke, tmp_path):
    out = tmp_path / "slips.json"
    got = invoke("gsm8k-slips", "--gsm8k", str(_gsm8k_file(tmp_path / "g.jsonl")), "--n", "10", "--seed", "1",
                 "--out", str(out))
    assert got.exit_code == 0, got.output
    assert got.stderr.strip() == (f"wrote 10 trajectories to {out} (5 with an error, 5 correct; "
                                  "arithmetic_propagated 5, correct 5)")
    loaded = load_records(out)
    assert loaded.skipped == [] and len(loaded.records) == 10
    for r in loaded.records:
        assert r.extra["source"] == "gsm8k-slips" and isinstance(r.extra["gsm8k_index"], int)
        assert r.extra["final_answer_correct"] == (r.label == -1) and r.steps[-1].startswith("The answer is ")


def test_gsm8k_slips_reports_skipped_records(invoke, tmp_path):
    path = _gsm8k_file(tmp_path / "g.jsonl", 12)
    path.write_text(path.read_text() + "{broken\n" + json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    got = invoke("gsm8k-slips", "--gsm8k", str(path), "--n", "12", "--out", str(tmp_path / "o.json"))
    assert got.exit_code == 0, got.output
    assert "skipped 2 GSM8K records: " in got.stderr and "not JSON" in got.stderr and "####" in got.stderr


def test_bad_input_is_one_line_error(invoke, tmp_path):
    good = _gsm8k_file(tmp_path / "g.jsonl")
    out = str(tmp_path / "o.json")
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(tmp_path / "missing.jsonl"), "--out", out), "missing.jsonl", "does not exist")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\nnor this\n")
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(broken), "--out", out), "broken.jsonl", "not JSON Lines")
    array = tmp_path / "pb.json"
    array.write_text('[{"id": "a", "problem": "p", "steps": ["s"], "label": -1}]')
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(array), "--out", out), "JSON array")
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(good), "--n", "0", "--out", out), "--n must be >= 1")
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(good), "--n", "31", "--out", out), "only 30 of 31")
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(good), "--error-rate", "1.5", "--out", out), "--error-rate")
    _one_line_error(invoke("gsm8k-slips", "--gsm8k", str(good), "--n", "4", "--out", str(tmp_path / "no" / "o.json")),
                    "cannot write")
    _one_line_error(invoke("synthetic", "--n", "0", "--out", out), "--n must be >= 1")
    _one_line_error(invoke("synthetic", "--n", "5", "--kinds", "bogus", "--out", out), "unknown error kind 'bogus'")
    _one_line_error(invoke("synthetic", "--n", "5", "--out", str(tmp_path)), "is a directory")
    assert not Path(out).exists()  # nothing half-written by any of them


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    out = tmp_path / "o.json"
    good = [Record(id="a", problem="p", steps=["s"], label=-1)]
    assert save_processbench(good, out) == 1
    before = out.read_text()
    with pytest.raises(TypeError):  # fails halfway through json.dump
        save_processbench(good + [Record(id="b", problem="p", steps=["s"], label=0, extra={"x": object()})], out)
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]
    assert json.loads(before) == [{"id": "a", "generator": "actprm", "problem": "p", "steps": ["s"],
                                   "final_answer_correct": True, "label": -1}]


@pytest.mark.data
def test_real_gsm8k_through_the_cli(invoke, tmp_path):
    path = DATA / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(reason=f"real data absent: {path} (../shared/data next to the checkout)")
    out = tmp_path / "slips.json"
    got = invoke("gsm8k-slips", "--gsm8k", str(path), "--n", "100", "--seed", "0", "--out", str(out))
    assert got.exit_code == 0, got.output
    loaded = load_records(out)
    assert len(loaded.records) == 100 and sum(r.label != -1 for r in loaded.records) == 50
